"""The outputs of ``hybridlm compare``: the printed table, ``report.md``, ``results.json`` and PNG plots.

Plots need matplotlib (the ``[plot]`` extra); without it the report says so and everything else is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hybridlm.atomic_files import atomic_write_text
from hybridlm.describe import human_bytes

PLOTS = {"accuracy": "accuracy_vs_length.png", "decode": "decode_vs_context.png",
         "prefill": "prefill_vs_context.png", "memory": "state_vs_context.png", "width": "accuracy_vs_width.png"}


def _label(f: dict[str, Any], results: dict[str, Any]) -> str:
    # a run's name in tables and legends: the family, with its width when the comparison sweeps widths and the
    # learning rate chosen when it sweeps those
    s = results["settings"]
    label = f"{f['label']} d{f['d_model']}" if s.get("widths") else f["label"]
    return f"{label} (lr {f['lr']:g})" if s.get("lrs") else label


def summary_table(results: dict[str, Any]) -> str:
    """One markdown table: a row per family with accuracy per length, speed, state size and parameters."""
    s = results["settings"]
    lengths = [str(n) for n in s["eval_lengths"]]
    top = str(max(s["contexts"]))
    head = (["family", "layers", "params"] + [f"acc@{n}" for n in lengths]
            + ["train tok/s", f"prefill@{top} (s)", f"decode@{top} (ms/tok)", f"state@{top}"])
    rows = []
    for f in results["families"]:
        sp = f["speed"][top]
        rows.append([_label(f, results), f["layers"], f"{f['parameters']:,}"]
                    + [f"{100 * f['accuracy'][n]:.1f}%" for n in lengths]
                    + [f"{f['train_tokens_per_s']:,.0f}", f"{sp['prefill_s']:.3f}", f"{sp['decode_ms_per_token']:.2f}",
                       human_bytes(f["state_bytes"][top])])
    return _markdown(head, rows)


def _width_text(s: dict[str, Any]) -> str:
    return "d_model " + (", ".join(str(w) for w in s["widths"]) if s.get("widths") else str(s["d_model"]))


def _lr_text(s: dict[str, Any]) -> str:
    if not s.get("lrs"):
        return f"lr {s['lr']}"
    return ("the best of lr " + ", ".join(f"{lr:g}" for lr in s["lrs"])
            + " per family and width (mean accuracy over the lengths; every rate's in the Training table)")


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _by_context(results: dict[str, Any], key: str, fmt) -> str:
    contexts = [str(c) for c in results["settings"]["contexts"]]
    rows = [[_label(f, results)] + [fmt(f, c) for c in contexts] for f in results["families"]]
    return _markdown(["family"] + [f"{int(c):,}" for c in contexts], rows)


def _task_params_text(params: dict[str, Any] | None) -> str:
    # {"n_pairs": 4, "vocab_size": 32} -> " (n_pairs 4, vocab_size 32)"
    return " (" + ", ".join(f"{k} {v}" for k, v in params.items()) + ")" if params else ""


def report_markdown(results: dict[str, Any], plots: dict[str, str], plot_note: str | None) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"# hybridlm compare: {s['task']}" + _task_params_text(s.get("task_params")),
        "",
        f"Trained at length {s['train_length']}"
        + (f" (a curriculum: the first {s['short_steps']:,} steps on sequences of {s['short_length']}, the same "
           f"tokens per step)" if s.get("short_length") and s.get("short_steps") else "")
        + f" on {s['steps'] * s['batch_size'] * s['train_length']:,} tokens "
        f"per family (the same samples for every family: seed {s['seed']}; steps and batch per family in the "
        f"Training table), {_lr_text(s)}, weight decay {s['weight_decay']}, {_width_text(s)}, "
        f"{s['n_layers']} layers. "
        f"Accuracy on {s['eval_samples']} fresh sequences per length. Machine: {m['processor']}, "
        f"{m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}"
        + (f", load average {m['load_average']:.1f} at the end" if m.get("load_average") is not None else "")
        + ". "
        f"Total time {results['total_seconds']:.0f} s.",
        "",
        "## Summary",
        "",
        summary_table(results),
        "",
        *_width_section(results),
        "## Prefill time (s, batch 1) vs context",
        "",
        _by_context(results, "prefill", lambda f, c: f"{f['speed'][c]['prefill_s']:.4f}"),
        "",
        "## Decode time (ms per token, batch 1) vs context",
        "",
        _by_context(results, "decode", lambda f, c: f"{f['speed'][c]['decode_ms_per_token']:.3f}"),
        "",
        "## Inference state (KV cache / SSM state, float32, batch 1) vs context",
        "",
        _by_context(results, "memory", lambda f, c: human_bytes(f["state_bytes"][c])),
        "",
        "## Training",
        "",
        _markdown(["family", "steps x batch", "train time (s)", "final train loss", "tokens/s"]
                  + (["mean accuracy by lr"] if s.get("lrs") else []),
                  [[_label(f, results), f"{f['train_steps']:,} x {f['train_batch_size']}", f"{f['train_seconds']:.1f}",
                    f"{f['final_train_loss']:.2e}", f"{f['train_tokens_per_s']:,.0f}"]
                   + ([", ".join(f"{lr}: {100 * a:.1f}%" for lr, a in f["lr_sweep"].items())] if s.get("lrs") else [])
                   for f in results["families"]]),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    if plot_note:
        lines += [f"_{plot_note}_", ""]
    return "\n".join(lines)


def width_table(results: dict[str, Any]) -> str:
    """Accuracy at the training length by family and width, with the state each holds there: Zoology's curve."""
    s = results["settings"]
    n = str(s["train_length"])
    families = list(dict.fromkeys(f["family"] for f in results["families"]))
    cell = {(f["family"], f["d_model"]): f for f in results["families"]}
    rows = [[next(f["label"] for f in results["families"] if f["family"] == family)]
            + [f"{100 * cell[family, w]['accuracy'][n]:.1f}% ({human_bytes(cell[family, w]['state_bytes'][n])}"
               + (f"; lr {cell[family, w]['lr']:g})" if s.get("lrs") else ")")
               for w in s["widths"]] for family in families]
    return _markdown(["family"] + [f"d_model {w}" for w in s["widths"]], rows)


def _width_section(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    if not s.get("widths"):
        return []
    return [f"## Recall vs width (accuracy at length {s['train_length']}; inference state there)", "",
            "Zoology (Arora et al. 2023) found attention solves associative recall at every width while "
            "attention-free models need a width (a state) growing with the number of pairs.", "",
            width_table(results), ""]


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the PNG plots; returns {name: file name}. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    written = {}

    def plot(name: str, xs: list[int], ys_of, ylabel: str, title: str, log_y: bool = False, percent=False):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for i, f in enumerate(results["families"]):  # distinct markers and dashes: equal results overlap
            ax.plot(xs, [ys_of(f, x) for x in xs], marker="os^D"[i % 4], linestyle=("-", "--", "-.", ":")[i % 4],
                    markersize=max(3, 7 - i), label=_label(f, results))
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        if percent:
            ax.set_ylim(-2, 102)
            ax.axvline(s["train_length"], color="grey", linestyle=":", linewidth=1)
            ax.text(s["train_length"], 80, " train length", color="grey", fontsize=8)
        ax.set_xlabel("sequence length (tokens)" if percent else "context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if percent else "best")
        fig.tight_layout()
        tmp = out_dir / f".{PLOTS[name]}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out_dir / PLOTS[name])
        written[name] = PLOTS[name]

    plot("accuracy", s["eval_lengths"], lambda f, n: 100 * f["accuracy"][str(n)], "accuracy (%)",
         f"{s['task']}: trained at length {s['train_length']}", percent=True)
    plot("decode", s["contexts"], lambda f, c: f["speed"][str(c)]["decode_ms_per_token"], "ms per token",
         "decode time per token vs context (batch 1)", log_y=True)
    plot("prefill", s["contexts"], lambda f, c: f["speed"][str(c)]["prefill_s"], "seconds",
         "prefill time vs context (batch 1)", log_y=True)
    plot("memory", s["contexts"], lambda f, c: f["state_bytes"][str(c)], "bytes",
         "inference state (KV cache or SSM state) vs context", log_y=True)
    if s.get("widths"):
        n = str(s["train_length"])
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for i, family in enumerate(dict.fromkeys(f["family"] for f in results["families"])):
            runs = [f for f in results["families"] if f["family"] == family]
            ax.plot([f["d_model"] for f in runs], [100 * f["accuracy"][n] for f in runs], marker="os^D"[i % 4],
                    linestyle=("-", "--", "-.", ":")[i % 4], label=runs[0]["label"])
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("model width (d_model)")
        ax.set_ylabel(f"accuracy at length {n} (%)")
        ax.set_title(f"{s['task']}: recall vs width", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out_dir / f".{PLOTS['width']}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out_dir / PLOTS["width"])
        written["width"] = PLOTS["width"]
    return written


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """results.json, the plots (when matplotlib is there) and report.md, each written atomically."""
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    try:
        plots, note = write_plots(results, out_dir), None
    except ImportError:
        plots, note = {}, "Plots skipped: matplotlib is not installed (pip install 'hybridlm[plot]')."
    results["plots"] = plots
    results["plot_note"] = note
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", report_markdown(results, plots, note))

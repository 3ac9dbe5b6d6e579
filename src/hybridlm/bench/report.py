"""Bench results as a plain-text table (ours, peers, ratios, physical bounds), JSON and optional PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridlm.atomic_files import atomic_write_text


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def _rates(m: dict[str, Any]) -> str:
    return (f"streaming read {m['read_gbps']:.1f} GB/s; fp32 matmul {m['gemm_gflops']:.0f} GFLOP/s; "
            f"vectorised exp {m['exp_gps']:.2f} G/s")


def format_report(results: dict[str, Any]) -> str:
    """Markdown-style tables: per preset prefill tok/s, decode ms/token and training tok/s, with our/peer ratios."""
    m = results["machine"]
    out = [f"machine: {m['cpu']}; {m['threads']} threads; {_rates(m)}; "
           f"OMP_WAIT_POLICY {results.get('omp_wait_policy', 'unset')}"]
    rounds = results.get("settings", {}).get("rounds", 1)
    if rounds > 1:
        out.append(f"each figure: the median over {rounds} rounds of ours and the peers measured in turn")
    if "scan" in results:
        s = results["scan"]
        out.append(f"selective scan {tuple(s['shape'])} forward: {s['ms']:.1f} ms; exp bound "
                   f"{s['exp_bound_ms']:.1f} ms ({s['ratio_to_bound']:.2f}x the bound)")
    for preset, entry in results["presets"].items():
        subjects = entry["subjects"]
        ours = subjects["hybridlm"]
        peers = [p for p in subjects if p != "hybridlm"]
        out += ["", f"## {preset}"]
        if "machine" in entry:
            out.append(f"bounds from the machine as measured with this preset's rounds: {_rates(entry['machine'])}")
        header = ["prefill tokens", "ours tok/s"] + [f"{p} tok/s" for p in peers] + [f"ours/{p}" for p in peers]
        header += ["bound tok/s", "peak RSS MiB"]
        rows = []
        for length, lim in entry["limits"]["prefill"].items():
            mine = ours["prefill"].get(length) or ours["prefill"].get(str(length))
            theirs = [(subjects[p]["prefill"].get(length) or subjects[p]["prefill"].get(str(length))) for p in peers]
            if mine is None and not any(theirs):
                continue
            row = [str(length), _fmt(mine and mine["tok_s"])]
            row += [_fmt(t and t["tok_s"]) for t in theirs]
            row += [_fmt(mine["tok_s"] / t["tok_s"], 2) if mine and t else "-" for t in theirs]
            row += [_fmt(lim["bound_tok_s"], 0), _mib(mine and mine.get("peak_rss"))]
            rows.append(row)
        out += _table(header, rows)
        out.append("")
        header = ["decode context", "ours ms/token"] + [f"{p} ms/token" for p in peers]
        header += [f"{p}/ours" for p in peers] + ["bound ms", "state MiB", "peak RSS MiB"]
        rows = []
        for context, lim in entry["limits"]["decode"].items():
            mine = ours["decode"].get(context) or ours["decode"].get(str(context))
            theirs = [(subjects[p]["decode"].get(context) or subjects[p]["decode"].get(str(context))) for p in peers]
            if mine is None and not any(theirs):
                continue
            row = [str(context), _fmt(mine and mine["ms_token"], 2)]
            row += [_fmt(t and t["ms_token"], 2) for t in theirs]
            row += [_fmt(t["ms_token"] / mine["ms_token"], 2) if mine and t else "-" for t in theirs]
            row += [_fmt(lim["bound_ms"], 2), _mib(lim["state_bytes"]), _mib(mine and mine.get("peak_rss"))]
            rows.append(row)
        out += _table(header, rows)
        train = [(p, subjects[p]["train"]) for p in ["hybridlm", *peers] if subjects[p].get("train")]
        if train:
            parts = [f"{p} {t['tok_s']:.0f} tok/s" for p, t in train]
            if ours.get("train"):
                parts += [f"ours/{p} {ours['train']['tok_s'] / t['tok_s']:.2f}x" for p, t in train if p != "hybridlm"]
            out += ["", f"forward+backward at {train[0][1]['length']} tokens: " + ", ".join(parts)]
        forms = entry.get("linear_attention_forms")
        if forms:
            out += ["", "one linear-attention layer, batch 1: its chunked form vs the quadratic form (q kᵀ ⊙ D) v"]
            out += _table(["tokens", "chunked ms", "quadratic ms", "quadratic/chunked"],
                          [[str(n), _fmt(f.get("chunked_ms"), 2), _fmt(f.get("quadratic_ms"), 2),
                            _fmt(f.get("quadratic_over_chunked"), 2)] for n, f in forms.items()])
        for p, why in entry.get("not_measured", {}).items():
            out.append(f"{p}: not measured ({why})")
        skipped = {p: s["skipped"] for p, s in subjects.items() if s.get("skipped")}
        for p, what in skipped.items():
            out.append(f"{p}: skipped (time budget or error): {', '.join(what)}")
    return "\n".join(out)


def write_json(results: dict[str, Any], path: str | Path) -> None:
    """Write ``results`` to ``path`` atomically (temporary file beside it, then rename)."""
    atomic_write_text(path, json.dumps(results, indent=2, default=str))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an ImportError saying which extra brings it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'hybridlm[plot]'") from e
    return plt


def save_plots(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """PNG plots of prefill tok/s, decode ms/token and memory vs context: one colour per preset, ours solid, each
    peer its own line style and marker. Needs matplotlib (the ``plot`` extra)."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [("prefill", "tok_s", "prefill tokens/s", "prompt length (tokens)"),
              ("decode", "ms_token", "decode ms/token", "context (tokens)")]
    # Colour tells the preset, line and marker the subject: with 4 presets x 4 subjects, one colour per line
    # would repeat matplotlib's 10-colour cycle.
    colours = {preset: f"C{i % 10}" for i, preset in enumerate(results["presets"])}
    styles = {"hybridlm": ("-", "o"), "hf": ("--", "s"), "llamacpp": (":", "^"), "mambapy": ("-.", "D")}
    for section, key, ylabel, xlabel in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for preset, entry in results["presets"].items():
            for name, subject in entry["subjects"].items():
                points = sorted((int(k), v[key]) for k, v in subject[section].items())
                if points:
                    linestyle, marker = styles.get(name, ("--", "x"))
                    ax.plot(*zip(*points, strict=True), color=colours[preset], linestyle=linestyle, marker=marker,
                            label=f"{preset} ({name})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{section}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset, entry in results["presets"].items():
        points = sorted((int(k), v["state_bytes"] / 2**20) for k, v in entry["limits"]["decode"].items())
        ax.plot(*zip(*points, strict=True), color=colours[preset], marker="o", label=f"{preset} state/KV")
        rss = sorted((int(k), v["peak_rss"] / 2**20) for k, v in entry["subjects"]["hybridlm"]["prefill"].items()
                     if v.get("peak_rss"))
        if rss:
            ax.plot(*zip(*rss, strict=True), color=colours[preset], marker="x", linestyle=":",
                    label=f"{preset} peak RSS (prefill)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / "memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written

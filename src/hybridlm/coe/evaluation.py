"""Measuring a composition against the oracle on held-out ``{"prompt", "completion"}`` records.

Every expert scores every completion (mean per-token loss, see ``oracle``), so the oracle's choice and every
single expert's quality are known; the router is then judged by:

- routing accuracy: the share of prompts where the router's own choice is the oracle's;
- quality: the mean loss of the answering experts (the fallback below the threshold), against the best single
  expert and the oracle, and the share of the best-single -> oracle gap it closes
  ``(L_best - L_coe) / (L_best - L_oracle)``; ``quality_vs_oracle`` is ``L_oracle / L_coe`` (1 = the oracle's);
- compute per token: the answering expert's parameters over all experts' (running every expert is 1);
- router latency: the median wall time of ``route`` on one prompt, and its share of a ``gen_tokens``-token
  generation by the chosen expert (the overhead a user sees);
- the cost-quality curve (RouteLLM's view): for each confidence threshold, the share of prompts sent to the
  fallback (the expensive calls) and the quality then. Without a configured fallback the curve uses the best
  single expert as the strong model.

The floors of the issue: routing accuracy >= 0.95, quality >= 0.97 of the oracle's and better than every single
expert's, router overhead <= 5% of a 64-token generation.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hybridlm.atomic_files import atomic_path, atomic_write_text
from hybridlm.coe.composition import CompositionOfExperts
from hybridlm.coe.oracle import Example, loss_table, oracle_labels, read_examples

FLOORS = {"routing_accuracy": 0.95, "quality_vs_oracle": 0.97, "router_overhead": 0.05}


def gap_closed(loss: float, best_single: float, oracle: float) -> float:
    """The share of the best-single -> oracle loss gap that ``loss`` closes (1 when there is no gap to close)."""
    gap = best_single - oracle
    return 1.0 if gap <= 0 else (best_single - loss) / gap


def routing_metrics(losses: torch.Tensor, routed: list[int], answered: list[int], params: list[int]
                    ) -> dict[str, Any]:
    # losses: (n, N) per-token losses; routed/answered: the router's choice and the answering expert per prompt
    n, n_experts = losses.shape
    oracle = oracle_labels(losses)
    per_expert = losses.mean(0)
    best = int(per_expert.argmin())
    rows = torch.arange(n)
    coe_loss = float(losses[rows, torch.tensor(answered)].mean())
    oracle_loss = float(losses.min(-1).values.mean())
    best_loss = float(per_expert[best])
    return {
        "n_prompts": n,
        "routing_accuracy": sum(r == o for r, o in zip(routed, oracle, strict=True)) / n,
        "loss": {"composition": coe_loss, "oracle": oracle_loss, "best_single": best_loss,
                 "per_expert": per_expert.tolist()},
        "best_single_expert": best,
        "quality_vs_oracle": oracle_loss / coe_loss if coe_loss > 0 else 1.0,
        "gap_closed": gap_closed(coe_loss, best_loss, oracle_loss),
        "better_than_every_single": all(coe_loss < float(x) for x in per_expert),
        "compute_per_token": statistics.fmean(params[a] for a in answered) / sum(params),
        "compute_per_token_all_experts": 1.0,
        "oracle_share": [oracle.count(i) / n for i in range(n_experts)],
        "answered_share": [answered.count(i) / n for i in range(n_experts)],
    }


def cost_quality_curve(losses: torch.Tensor, routed: list[int], confidences: list[float], fallback: int
                       ) -> list[dict[str, float]]:
    # losses: (n, N) -> one point per distinct threshold: fallback share, mean loss, gap closed
    oracle_loss = float(losses.min(-1).values.mean())
    best_loss = float(losses.mean(0).min())
    thresholds = sorted({0.0, *confidences, 1.0 + 1e-9})
    points = []
    for t in thresholds:
        answered = [fallback if c < t else r for r, c in zip(routed, confidences, strict=True)]
        loss = float(losses[torch.arange(len(answered)), torch.tensor(answered)].mean())
        points.append({"threshold": min(t, 1.0), "fallback_share": sum(c < t for c in confidences) / len(routed),
                       "loss": loss, "gap_closed": gap_closed(loss, best_loss, oracle_loss)})
    return points


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(coe: CompositionOfExperts, examples: list[Example], gen_tokens: int = 64, gen_prompts: int = 3,
             latency_prompts: int = 32) -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-ready dict (expert indices named)."""
    if not examples:
        raise ValueError("--data: no held-out records to evaluate on")
    names = coe.expert_names
    experts = [coe.experts[n] for n in names]
    losses = loss_table([(e.model, e.tokenizer) for e in experts], examples)
    prompts = [e.prompt for e in examples]
    routed_names, confidences = coe.route(prompts, apply_fallback=False)
    routed = [names.index(n) for n in routed_names]
    answered = [names.index(n) for n in coe.route(prompts)[0]]
    params = [e.model.num_parameters(active=True) for e in experts]
    result = routing_metrics(losses, routed, answered, params)
    result["best_single_expert"] = names[result["best_single_expert"]]
    result["loss"]["per_expert"] = dict(zip(names, result["loss"]["per_expert"], strict=True))
    result["oracle_share"] = dict(zip(names, result["oracle_share"], strict=True))
    result["answered_share"] = dict(zip(names, result["answered_share"], strict=True))
    result["fallback"], result["threshold"] = coe.fallback, coe.threshold
    strong = names.index(coe.fallback) if coe.fallback else names.index(result["best_single_expert"])
    result["curve_fallback"] = names[strong]
    result["curve"] = cost_quality_curve(losses, routed, confidences, strong)
    # Latency: one prompt at a time, as a request arrives; the first calls warm caches up and are not counted.
    sample = prompts[:latency_prompts]
    for p in sample[:2]:
        coe.route([p])
    route_times = [_median_seconds(lambda p=p: coe.route([p]), 3) for p in sample]
    result["router_latency_s"] = statistics.median(route_times)
    if gen_tokens > 0 and gen_prompts > 0:
        gen = [_median_seconds(lambda p=p: coe.generate(p, gen_tokens, temperature=0, stop_at_eos=False), 1)
               for p in prompts[:gen_prompts]]
        result["generation_s"] = statistics.median(gen)
        result["gen_tokens"] = gen_tokens
        result["router_overhead"] = result["router_latency_s"] / result["generation_s"]
    result["floors"] = check_floors(result)
    return result


def check_floors(result: dict[str, Any]) -> dict[str, bool]:
    floors = {"routing_accuracy >= 0.95": result["routing_accuracy"] >= FLOORS["routing_accuracy"],
              "quality >= 0.97 of oracle": result["quality_vs_oracle"] >= FLOORS["quality_vs_oracle"],
              "better than every single expert": result["better_than_every_single"]}
    if "router_overhead" in result:
        floors["router overhead <= 5% of a generation"] = result["router_overhead"] <= FLOORS["router_overhead"]
    return floors


def table(result: dict[str, Any]) -> str:
    """The headline figures as an aligned text table."""
    loss = result["loss"]
    rows = [("prompts", f"{result['n_prompts']}"),
            ("routing accuracy (vs oracle)", f"{result['routing_accuracy']:.3f}"),
            ("loss: composition", f"{loss['composition']:.4f}"),
            ("loss: oracle", f"{loss['oracle']:.4f}"),
            (f"loss: best single ({result['best_single_expert']})", f"{loss['best_single']:.4f}")]
    rows += [(f"loss: {name}", f"{value:.4f}") for name, value in loss["per_expert"].items()]
    rows += [("quality vs oracle (L_oracle / L_coe)", f"{result['quality_vs_oracle']:.4f}"),
             ("best-single -> oracle gap closed", f"{result['gap_closed']:.3f}"),
             ("compute per token (all experts = 1)", f"{result['compute_per_token']:.3f}"),
             ("router latency per prompt (median)", f"{result['router_latency_s'] * 1e3:.2f} ms")]
    if "router_overhead" in result:
        rows += [(f"{result['gen_tokens']}-token generation (median)", f"{result['generation_s'] * 1e3:.1f} ms"),
                 ("router overhead", f"{result['router_overhead'] * 100:.2f}%")]
    rows += [(f"floor: {name}", "holds" if ok else "FAILS") for name, ok in result["floors"].items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_curve(result: dict[str, Any], json_path: Path, png_path: Path | None) -> str:
    """The cost-quality curve as JSON and, when matplotlib is installed, PNG; returns a line saying what was written."""
    atomic_write_text(json_path, json.dumps({"fallback": result["curve_fallback"], "points": result["curve"]},
                                            indent=2) + "\n")
    if png_path is None:
        return f"curve: {json_path}"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"curve: {json_path} (no PNG: matplotlib is missing; pip install 'hybridlm[plot]')"
    points = result["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["fallback_share"] for p in points], [p["loss"] for p in points], marker=".")
    ax.axhline(result["loss"]["oracle"], ls="--", c="g", label="oracle")
    ax.axhline(result["loss"]["best_single"], ls=":", c="r", label=f"best single ({result['best_single_expert']})")
    ax.set_xlabel(f"share of prompts sent to {result['curve_fallback']} (fallback)")
    ax.set_ylabel("mean loss on completion (nats/token)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return f"curve: {json_path}, {png_path}"


def evaluate_directory(coe_dir: str | Path, data: str | Path, out: str | Path | None = None,
                       gen_tokens: int = 64) -> tuple[dict[str, Any], str]:
    """Load ``coe_dir``, evaluate on ``data``; write ``eval.json`` and the curve into ``out`` (default: the CoE
    directory). Returns the result and the text report."""
    coe = CompositionOfExperts.from_pretrained(coe_dir)
    examples = read_examples(str(data), require_completion=True)
    result = evaluate(coe, examples, gen_tokens=gen_tokens)
    out = Path(out) if out is not None else Path(coe_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    note = write_curve(result, out / "cost_quality.json", out / "cost_quality.png")
    return result, f"{table(result)}\n{note}\nresults: {out / 'eval.json'}"

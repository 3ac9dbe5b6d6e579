"""``hybridlm bench --attention``: how much of softmax attention each approximation keeps, at what cost, by length.

For random q, k, v and for the q, k, v of a trained model's last attention layer on real text (the built-in corpus),
at each length: the time and peak memory of exact attention (SDPA: PyTorch's flash / memory-efficient kernels where
the device has them) and of each approximation, and each one's error against the exact attention it approximates:
the relative Frobenius error of the output, and of the attention rows of a sample of queries.

What each approximates (its "target"): sliding window and Performer, causal softmax attention; LSH, Reformer's
shared-QK causal attention (queries as keys, normalised; the layer's queries are the shared vectors); Nyströmformer,
bidirectional softmax attention; Skyformer, bidirectional Gaussian-kernel attention (its own kernel, not softmax's).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybridlm.atomic_files import atomic_write_text
from hybridlm.bench.report import pyplot
from hybridlm.bench.runner import peak_rss_bytes, reset_peak_rss, set_threads
from hybridlm.ops.attention.torch_ops import sdpa, sliding_window_attention
from hybridlm.ops.linear_attention.chunked import linear_attention_chunked
from hybridlm.ops.linear_attention.feature_maps import NORMALIZER_EPS, feature_map, orthogonal_features
from hybridlm.ops.low_rank_attention.nystrom import nystrom_attention, nystrom_weights
from hybridlm.ops.low_rank_attention.skyformer import (
    gaussian_kernel,
    gaussian_kernel_attention,
    skyformer_attention,
    skyformer_weights,
)
from hybridlm.ops.lsh_attention.dense import lsh_attention_rows, shared_qk_attention, shared_qk_rows
from hybridlm.ops.lsh_attention.hashing import hash_buckets, random_rotations
from hybridlm.ops.lsh_attention.sorted_chunks import lsh_attention_sorted

QUERY_BLOCK = 256  # queries at a time where an exact target is formed by hand (memory O(block · l))


@dataclass
class AttentionBenchSettings:
    lengths: tuple[int, ...] = (1024, 4096, 16384)
    heads: int = 2
    head_dim: int = 64
    threads: int = 2
    repeats: int = 3  # timed runs per point (median), after a warm-up
    sample_rows: int = 32  # queries whose attention rows are compared (evenly spaced, the last included)
    inputs: tuple[str, ...] = ("random", "trained")
    model: str | None = None  # a checkpoint with attention layers for the trained inputs (or run(model=...))
    train_steps: int = 300  # the CLI's small model, trained when no checkpoint is given (about a minute here)
    window: int = 512  # sliding window
    performer_features: int = 256  # FAVOR+'s m
    lsh_chunk: int = 64  # keys a round (Reformer's 64); buckets: length / chunk (even), so a bucket fits a chunk
    lsh_rounds: int = 4
    landmarks: int = 64  # Nyströmformer's m (the paper's 64)
    skyformer_landmarks: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """One attention (exact or approximate): how to run it, which exact attention it approximates, its rows."""

    kind: str  # the method without its settings: "LSH", "Performer", ... (the plot's legend)
    name: str
    target: str  # a key of TARGETS
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) -> output
    rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, rows) -> (b, h, n, l)


# ---------------------------------------------------------------------------------------------- exact targets
def _masked_softmax_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal: bool,
                         window: int | None = None) -> torch.Tensor:
    # q, k: (b, h, l, d)  rows: (n,) -> (b, h, n, l): softmax(q kᵀ/√d) at those queries, causal (and banded)
    scores = q[:, :, rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        distance = rows[:, None] - torch.arange(k.shape[2], device=q.device)
        hidden = (distance < 0) if window is None else (distance < 0) | (distance >= window)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, -1)


def _gaussian_kernel_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # κ(Q, K) V a block of queries at a time: never an (l, l) kernel matrix
    return torch.cat([gaussian_kernel_attention(q[:, :, s:s + QUERY_BLOCK], k, v)
                      for s in range(0, q.shape[2], QUERY_BLOCK)], 2)


TARGETS: dict[str, tuple[Callable, Callable]] = {
    # name: (output (q, k, v) -> o, rows (q, k, rows) -> (b, h, n, l))
    "causal softmax": (lambda q, k, v: sdpa(q, k, v, is_causal=True),
                       lambda q, k, rows: _masked_softmax_rows(q, k, rows, True)),
    "softmax": (lambda q, k, v: sdpa(q, k, v), lambda q, k, rows: _masked_softmax_rows(q, k, rows, False)),
    "shared-QK causal softmax": (lambda q, k, v: shared_qk_attention(q, v, block=QUERY_BLOCK),
                                 lambda q, k, rows: shared_qk_rows(q, rows)),
    "Gaussian kernel": (_gaussian_kernel_blocked,
                        lambda q, k, rows: gaussian_kernel(q[:, :, rows] * q.shape[-1] ** -0.25,
                                                           k * q.shape[-1] ** -0.25)),
}


# -------------------------------------------------------------------------------------------------- methods
def methods(settings: AttentionBenchSettings, length: int) -> list[Method]:
    """Every method measured at ``length``, exact attention first."""
    s = settings
    performer_w = orthogonal_features(s.performer_features, s.head_dim, torch.Generator().manual_seed(s.seed))
    n_buckets = max(2, 2 * (length // s.lsh_chunk // 2))
    rotations = random_rotations(s.heads, s.lsh_rounds, s.head_dim, n_buckets, seed=s.seed)

    def performer(q, k, v):
        fq, fk = feature_map(q, "performer", performer_w, query=True), feature_map(k, "performer", performer_w)
        o, _ = linear_attention_chunked(fq, fk, torch.cat([v, torch.ones_like(v[..., :1])], -1))
        return o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS)

    def performer_rows(q, k, rows):
        fq, fk = feature_map(q[:, :, rows], "performer", performer_w, query=True), feature_map(k, "performer",
                                                                                              performer_w)
        kernel = (fq @ fk.transpose(-1, -2)).masked_fill(torch.arange(k.shape[2]) > rows[:, None], 0)
        return kernel / (kernel.sum(-1, keepdim=True) + NORMALIZER_EPS)

    def lsh(q, k, v):
        return lsh_attention_sorted(q, v, hash_buckets(q, rotations, n_buckets), s.lsh_chunk)

    def lsh_rows(q, k, rows):
        return lsh_attention_rows(q, hash_buckets(q, rotations, n_buckets), s.lsh_chunk, rows)

    exact_causal, exact_rows = TARGETS["causal softmax"]
    exact, exact_bidirectional_rows = TARGETS["softmax"]
    return [
        Method("exact causal", "exact causal (SDPA)", "causal softmax", exact_causal, exact_rows),
        Method("sliding window", f"sliding window {s.window}", "causal softmax",
               lambda q, k, v: sliding_window_attention(q, k, v, s.window),
               lambda q, k, rows: _masked_softmax_rows(q, k, rows, True, s.window)),
        Method("Performer", f"Performer m={s.performer_features}", "causal softmax", performer, performer_rows),
        Method("LSH", f"LSH {s.lsh_rounds} rounds, {n_buckets} buckets, chunk {s.lsh_chunk}",
               "shared-QK causal softmax", lsh, lsh_rows),
        Method("exact bidirectional", "exact bidirectional (SDPA)", "softmax", exact, exact_bidirectional_rows),
        Method("Nystromformer", f"Nystromformer m={s.landmarks}", "softmax",
               lambda q, k, v: nystrom_attention(q, k, v, min(s.landmarks, length)),
               lambda q, k, rows: nystrom_weights(q, k, min(s.landmarks, length), rows)),
        Method("Skyformer", f"Skyformer m={s.skyformer_landmarks}", "Gaussian kernel",
               lambda q, k, v: skyformer_attention(q, k, v, min(s.skyformer_landmarks, 2 * length), seed=s.seed),
               lambda q, k, rows: skyformer_weights(q, k, min(s.skyformer_landmarks, 2 * length), rows,
                                                    seed=s.seed)),
    ]


# --------------------------------------------------------------------------------------------------- inputs
def random_inputs(settings: AttentionBenchSettings, length: int) -> tuple[torch.Tensor, ...]:
    """Gaussian q, k, v (1, heads, length, head_dim): scores of about unit spread, so attention is spread wide."""
    g = torch.Generator().manual_seed(settings.seed + length)
    return tuple(torch.randn(1, settings.heads, length, settings.head_dim, generator=g) for _ in range(3))


def model_config(settings: AttentionBenchSettings, vocab_size: int):
    """The small Transformer ``hybridlm bench --attention`` trains when no model is given: 2 layers, ``heads`` heads of
    ``head_dim`` (the bench's shapes), to be trained for ``train_steps`` on the built-in corpus, byte-level."""
    from hybridlm.config import ModelConfig

    return ModelConfig(name="attention-bench", vocab_size=vocab_size, d_model=settings.heads * settings.head_dim,
                       n_layers=2, layers="A", n_heads=settings.heads, head_dim=settings.head_dim)


def load_model(path: str | Path):
    """A checkpoint to take the trained q, k, v from, and its tokenizer; it must have an attention layer."""
    from hybridlm.model import HybridLM
    from hybridlm.tokenizer import load_tokenizer

    model = HybridLM.from_pretrained(path).eval()
    if "A" not in model.config.layers:
        raise ValueError(f"--attention-model: {path} has no attention layer (layers {model.config.layers!r})")
    return model, load_tokenizer(path)


@torch.no_grad()
def trained_inputs(model, tokenizer, length: int, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``model``'s last attention layer on the first ``length`` tokens of the built-in corpus (keys and
    values repeated to every query head), at most ``heads`` heads."""
    from hybridlm.data.token_file import tokenize_corpus

    tokens = tokenize_corpus(None, tokenizer)
    if len(tokens) < length:
        raise ValueError(f"--attention-lengths: the built-in corpus has {len(tokens):,} tokens, fewer than {length:,}")
    ids = torch.as_tensor(tokens[:length].astype("int64"))[None]
    layer = max(i for i, letter in enumerate(model.config.layers) if letter == "A")
    x = model.embedding(ids)
    for block in model.layers[:layer]:
        x, _ = block(x, None, None)
    attention = model.layers[layer].mixer
    q, k, v = attention.queries_keys_values(model.layers[layer].norm(x))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return q[:, :heads].contiguous(), k[:, :heads].contiguous(), v[:, :heads].contiguous()


# ------------------------------------------------------------------------------------------------ measuring
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _return_freed_memory() -> None:
    # Peak memory is read from the RSS high-water mark. glibc serves large blocks freed by an earlier run from its
    # heap (its mmap threshold grows as big blocks are freed), so a run would reuse pages and look free. Fixing the
    # threshold (mallopt M_MMAP_THRESHOLD, which also stops it moving) sends every block over 64 KiB to mmap and back
    # to the system when freed. Elsewhere than glibc this does nothing and peaks may read low.
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(method: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Run ``method`` once to warm up, then ``repeats`` times: its output and {seconds (median), peak bytes above the
    memory held before it}."""
    method.run(q, k, v)
    times = []
    peaks = []
    for _ in range(repeats):
        _return_freed_memory()
        tracked = reset_peak_rss()
        before = peak_rss_bytes() if tracked else None
        start = time.perf_counter()
        out = method.run(q, k, v)
        times.append(time.perf_counter() - start)
        after = peak_rss_bytes() if tracked else None
        if before is not None and after is not None:
            peaks.append(after - before)
        del out
    out = method.run(q, k, v)
    return out, {"seconds": statistics.median(times), "peak_bytes": max(peaks) if peaks else None}


def run(settings: AttentionBenchSettings, model=None, tokenizer=None, log: Callable[[str], None] = lambda msg: None
        ) -> dict[str, Any]:
    """Every method at every length on every kind of input: time, peak memory, output and row errors. The trained
    inputs come from ``model`` (a ``HybridLM`` with an attention layer) on the built-in corpus, in ``tokenizer``'s ids;
    without a model, ``settings.model`` is loaded."""
    for name in ("lengths", "inputs"):
        if not getattr(settings, name):
            raise ValueError(f"{name}: expected at least one, got {getattr(settings, name)!r}")
    unknown = [i for i in settings.inputs if i not in ("random", "trained")]
    if unknown:
        raise ValueError(f"inputs: expected 'random' and/or 'trained', got {unknown}")
    set_threads(settings.threads)
    if "trained" in settings.inputs and model is None:
        if settings.model is None:
            raise ValueError("inputs: 'trained' needs a model (settings.model, or the model argument)")
        model, tokenizer = load_model(settings.model)
    results: dict[str, Any] = {"settings": asdict(settings), "runs": []}
    with torch.no_grad():
        for kind in settings.inputs:
            _measure_kind(settings, kind, model, tokenizer, results["runs"], log)
    return results


def _measure_kind(settings: AttentionBenchSettings, kind: str, model, tokenizer, records: list[dict[str, Any]],
                  log: Callable[[str], None]) -> None:
    # every length of one kind of input: each method beside the exact attention it approximates
    for length in settings.lengths:
        q, k, v = (random_inputs(settings, length) if kind == "random"
                   else trained_inputs(model, tokenizer, length, settings.heads))
        rows = torch.linspace(0, length - 1, min(settings.sample_rows, length)).round().long().unique()
        targets = {}
        for method in methods(settings, length):
            if method.target not in targets:
                output, row_fn = TARGETS[method.target]
                targets[method.target] = (output(q, k, v), row_fn(q, k, rows))
            exact_out, exact_rows = targets[method.target]
            out, cost = measure(method, q, k, v, settings.repeats)
            record = {"inputs": kind, "length": length, "kind": method.kind, "method": method.name,
                      "target": method.target, **cost, "output_error": _relative_error(out, exact_out),
                      "row_error": _relative_error(method.rows(q, k, rows), exact_rows)}
            records.append(record)
            log(f"[{kind} {length}] {method.name}: {record['seconds'] * 1000:.1f} ms, output error "
                f"{record['output_error']:.3g}, row error {record['row_error']:.3g}")


# -------------------------------------------------------------------------------------------------- outputs
def format_report(results: dict[str, Any]) -> str:
    """One table per kind of input: each method's time, its ratio to exact attention of the same causality, peak
    memory and errors, by length."""
    out = []
    runs = results["runs"]
    for kind in dict.fromkeys(r["inputs"] for r in runs):
        out += ["", f"## {kind} q, k, v"
                + (" (the last attention layer of a trained model, on the built-in corpus)" if kind == "trained"
                   else " (Gaussian)"), "",
                "| length | method | target | ms | x exact | peak MiB | output error | row error |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in runs if r["inputs"] == kind):
            bidirectional = r["target"] in ("softmax", "Gaussian kernel")
            exact = next(x for x in runs if x["inputs"] == kind and x["length"] == r["length"]
                         and x["method"] == ("exact bidirectional (SDPA)" if bidirectional else "exact causal (SDPA)"))
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            out.append(f"| {r['length']:,} | {r['method']} | {r['target']} | {r['seconds'] * 1000:.1f} | "
                       f"{r['seconds'] / exact['seconds']:.2f} | {peak} | {r['output_error']:.3g} | "
                       f"{r['row_error']:.3g} |")
    return "\n".join(out).lstrip()


def write_json(results: dict[str, Any], path: str | Path) -> None:
    import json

    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def save_plot(results: dict[str, Any], directory: str | Path) -> list[Path]:
    """Output error against time, one panel per kind of input, one marker per method, one colour per length (PNG;
    needs matplotlib, the ``plot`` extra)."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    kinds = list(dict.fromkeys(r["inputs"] for r in runs))
    lengths = sorted({r["length"] for r in runs})
    names = list(dict.fromkeys(r["kind"] for r in runs))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for r in (r for r in runs if r["inputs"] == kind):
            ax.scatter(r["seconds"], max(r["output_error"], 1e-8), color=f"C{lengths.index(r['length']) % 10}",
                       marker="osD^v<>ph*"[names.index(r["kind"]) % 10])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("relative output error (exact: 1e-8)")
        ax.set_title(f"{kind} q, k, v")
    handles = [plt.Line2D([], [], color="k", marker="osD^v<>ph*"[i % 10], linestyle="", label=n)
               for i, n in enumerate(names)]
    handles += [plt.Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="", label=f"length {n:,}")
                for i, n in enumerate(lengths)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    path = directory / "attention_error_vs_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]

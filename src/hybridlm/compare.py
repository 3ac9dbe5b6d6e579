"""``hybridlm compare``: train the families side by side on one synthetic task, then measure and report.

Every family gets the same task, the same samples (one seed), the same number of tokens (the Transformer
in larger batches, see ``CompareSettings``), and a model of about the same size (the Mamba paper's
synthetic-task scale: 2 layers, d_model 64). Reported per family: accuracy at the training length and beyond
it (length extrapolation), training tokens/s, prefill time and decode time per token against context length,
inference-state bytes (KV cache or fixed SSM state) against context length, and parameters. Writes
``report.md``, ``results.json`` and PNG plots.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.config import ModelConfig
from hybridlm.data.source import TaskSource
from hybridlm.data.tasks import get_task
from hybridlm.evaluate import task_accuracy
from hybridlm.model import HybridLM
from hybridlm.train import TrainConfig, train

# Layer patterns of the families at n_layers = 2 (tiled for more). The hybrid is Jamba-style: a Mamba layer
# then an attention layer without positional encoding (Jamba uses none: the Mamba layers carry position).
# The linear-attention families are the "L" mixer's published variants (see hybridlm.layers.linear_attention).
FAMILIES: dict[str, dict[str, Any]] = {
    "transformer": dict(layers="A", ffn="mlp", large_batch=True),
    "mamba": dict(layers="M", ffn="none"),
    "mamba2": dict(layers="S", ffn="none"),
    "hybrid": dict(layers="MA", ffn="mlp", rope_theta=None),
    "linear": dict(layers="L", ffn="mlp", mixer_options={"L": dict(feature_map="elu1")}),
    "performer": dict(layers="L", ffn="mlp", mixer_options={"L": dict(feature_map="performer")}),
    "based": dict(layers="L", ffn="mlp", mixer_options={"L": dict(feature_map="taylor", short_conv=3)}),
    # Based's recipe: its linear attention beside sliding-window attention (window 64, as Based's models)
    "based_hybrid": dict(layers="LA", ffn="mlp", sliding_window=64,
                         mixer_options={"L": dict(feature_map="taylor", short_conv=3)}),
    "sliding_window": dict(layers="A", ffn="mlp", sliding_window=64, large_batch=True),
    "retnet": dict(layers="L", ffn="mlp", mixer_options={"L": dict(feature_map="identity", decay="fixed",
                                                                    norm="rms", output_gate=True)}),
    "gla": dict(layers="L", ffn="mlp", mixer_options={"L": dict(feature_map="identity", decay="gla", norm="rms",
                                                                 output_gate=True)}),
    # Reformer's LSH attention with its own defaults (8 buckets, 4 rounds, 64 keys a round); attention, so it takes
    # the Transformer's larger batches
    "lsh": dict(layers="R", ffn="mlp", large_batch=True),
}
DEFAULT_FAMILIES = ["transformer", "mamba", "mamba2", "hybrid"]  # the README's run; --families names the others
LABELS = {"transformer": "Transformer (RoPE)", "mamba": "Mamba-1", "mamba2": "Mamba-2",
          "hybrid": "Hybrid (Mamba + attention, no PE)", "linear": "Linear attention (elu+1)",
          "performer": "Performer (FAVOR+)", "based": "Based (Taylor + conv)",
          "based_hybrid": "Based + sliding window (64)", "sliding_window": "Sliding-window attention (64)",
          "retnet": "RetNet (fixed decay)", "gla": "GLA (gated)",
          "lsh": "LSH attention (Reformer)"}


@dataclass
class CompareSettings:
    task: str = "induction_heads"
    task_params: dict[str, int] = field(default_factory=dict)  # e.g. mqar's {"n_pairs": 16, "vocab_size": 128}
    families: list[str] = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    d_model: int = 64
    # Train every family at each of these widths (d_model) in place of d_model: Zoology's recall-vs-width curve
    widths: list[int] | None = None
    n_layers: int = 2
    # Attention (and linear-attention) heads; None: d_model // 8 (head_dim 8, which leaves the induction plateau
    # sooner). Zoology's MQAR runs use 1 head: a Transformer of d_model 128 with 16 heads of 8 stayed on MQAR's
    # plateau (25%, lr 1e-3 and 3e-3) where 1 head of 128 at lr 1e-3 reached 98% in 400 steps of 256.
    n_heads: int | None = None
    # The Mamba paper's setting: trained at length 256 (Table 11), with a length curriculum: the first
    # `short_steps` steps see 4 sequences of 64 in place of each one of 256 (the same tokens). At 256 from the
    # start Mamba-1 had not learned the task after 1,000 steps of 16 (53%); at 64 throughout it learns within
    # ~800 steps but its accuracy at 4096 stalls at 67-97% (the loss saturates near 1e-8 at that length, so
    # nothing more pushes dt towards the near-zero values that carry the state across thousands of tokens).
    # In exploratory runs 1,000 steps at 64 and then 3,000 at 256 gave 100% at 4096, 2,000 and 2,000 98-99%;
    # the Transformer needs the longer warm-up (at 1/4 of its steps it had not left its plateau), hence
    # 2,000 short steps and then 3,000 at 256 (README: 100% of 128 sequences at 4096).
    # Every family gets the same tokens; how it takes them differs: induction heads scores one answer per
    # sequence, so the answers per step decide how soon the Transformer leaves its loss plateau (ln 14): with
    # 16 sequences of 64 a step it never did in 2,500 steps, with 64 it does within ~300 to ~600, while the
    # SSMs gain from more steps. So the Transformer (large_batch in FAMILIES) takes 4x the batch for 1/4 of
    # the steps (short ones included; see attention_batch_scale). Weight decay 0: with 0.1 on the matrices
    # Mamba-1 (4,000 steps of 16 at 64) reached 80% at 4096, without it 97%: decay pulls dt_proj and x_proj
    # towards the dt of initialisation, against the near-zero dt on irrelevant tokens that extrapolation needs.
    train_length: int = 256
    short_length: int | None = 64
    short_steps: int = 2000
    steps: int = 5000
    batch_size: int = 4
    # How many times the batch the attention families (large_batch in FAMILIES) take, for as many times fewer
    # steps. Attention leaves its plateau only with enough answers a step, and then needs steps. On MQAR at
    # d_model 64 (one head, lr 1e-3): at 4 pairs (length 64) 2,400 steps of 64 stayed on the plateau (26.6%)
    # where 600 steps of 256 reached 100%; at 32 pairs (length 128), with 8x the answers a sequence, 600 steps of
    # 256 stayed at 2.6%, 2,400 of 64 reached 100% (docs/linear_attention.md, "Over the number of pairs").
    attention_batch_scale: int = 4
    lr: float = 3e-3
    # Train every run at each of these learning rates in place of lr and keep the best (mean accuracy over the
    # evaluation lengths, then the lower final loss): Zoology reports the best of 4 learning rates per width
    # (np.logspace(-4, -2, 4) in its MQAR sweeps), since escaping recall's plateau hinges on it.
    lrs: list[float] | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 100
    seed: int = 0
    eval_lengths: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])
    eval_samples: int = 128  # at 4096 a score of 128/128 bounds the error rate below 2.3% (95% one-sided)
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    decode_steps: int = 16
    threads: int = 1  # torch/numba threads: one is fastest for models this small, and robust on a busy machine
    workers: int = 2  # families trained at once, each in its own process (speed is then measured one by one)
    isolate: bool = True  # each family in its own process (clean thread pools, fair timings)

    @classmethod
    def quick(cls, **overrides: Any) -> CompareSettings:
        """Seconds, not minutes: for tests and for checking an installation."""
        base = dict(d_model=32, n_layers=2, train_length=32, short_length=16, short_steps=4, steps=8,
                    batch_size=4, warmup_steps=2,
                    eval_lengths=[32, 64], eval_samples=8, contexts=[32, 64], decode_steps=2, isolate=False)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families: expected a non-empty list from {list(FAMILIES)}, got {self.families}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: expected an integer >= 1, got {self.workers!r}")
        scale = self.attention_batch_scale
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"attention_batch_scale: expected an integer >= 1, got {scale!r}")
        if self.n_heads is not None:
            for width in self.widths or [self.d_model]:
                if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int) or self.n_heads < 1 \
                        or width % self.n_heads:
                    raise ValueError(f"n_heads: expected a positive divisor of every width (d_model {width}), "
                                     f"got {self.n_heads!r}")
        for name in ("eval_lengths", "contexts", "widths"):
            values = getattr(self, name)
            if name == "widths" and values is None:
                continue
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f"{name}: expected positive integers, got {values}")
        if self.lrs is not None and (not self.lrs or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                          or not 0 < v < 1 for v in self.lrs)):
            raise ValueError(f"lrs: expected learning rates in (0, 1), got {self.lrs}")
        # a specific error for an unknown task, a too short length or a bad curriculum
        task = get_task(self.task, **self.task_params)
        TaskSource(task, self.train_length, short_length=self.curriculum_length, short_steps=self.short_steps)
        shortest = task.scored_task().min_length
        too_short = [n for n in self.eval_lengths if n < shortest]
        if too_short:  # found now rather than after training
            raise ValueError(f"eval_lengths: task {self.task!r} is scored on sequences of at least {shortest} "
                             f"tokens, got {too_short}")

    def batch_scale(self, family: str) -> int:
        """How many times the common batch ``family`` trains on, for as many times fewer steps (the same tokens)."""
        return self.attention_batch_scale if FAMILIES[family].get("large_batch") else 1

    @property
    def curriculum_length(self) -> int | None:
        """The length of the curriculum's first steps; None without them (``short_steps`` 0), whatever
        ``short_length`` says."""
        return self.short_length if self.short_steps else None


def family_config(family: str, d_model: int, n_layers: int, vocab_size: int, n_heads: int | None = None
                  ) -> ModelConfig:
    """The model of ``family`` at the comparison's scale. Sizes: Mamba-1 blocks (no MLP) set the budget;
    the Transformer's MLP width and Mamba-2's state are chosen to land within ~20% of it in parameters.
    ``n_heads``: attention heads (None: ``d_model // 8``)."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")
    spec = copy.deepcopy(FAMILIES[family])
    pattern = spec.pop("layers")
    spec.pop("large_batch", None)
    if n_layers % len(pattern):
        raise ValueError(f"n_layers: family {family!r} tiles the pattern {pattern!r}; give a multiple of "
                         f"{len(pattern)}, got {n_layers}")
    heads = n_heads or max(1, d_model // 8)  # head_dim 8: more heads leave the induction plateau sooner (see above)
    return ModelConfig(
        name=f"{family}-compare", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, layers=pattern,
        n_heads=heads, d_ff=max(32, 3 * d_model // 2), d_state=16,
        mamba2_d_state=16, mamba2_headdim=16, mamba2_chunk_size=16, **spec)


# ------------------------------------------------------------------------------------------ measurements
@torch.no_grad()
def measure_speed(model: HybridLM, context: int, decode_steps: int, vocab_size: int, repeats: int = 1
                  ) -> dict[str, float]:
    """Prefill seconds for ``context`` tokens and median decode milliseconds per token after it (batch 1)."""
    model.eval()
    generator = torch.Generator().manual_seed(context)
    ids = torch.randint(0, vocab_size, (1, context), generator=generator)
    prefill, decode = [], []
    for _ in range(repeats):
        state = model.init_state(1, max_len=context + decode_steps)
        t = time.perf_counter()
        logits = model(ids, state=state, logits_to_keep=1).logits
        prefill.append(time.perf_counter() - t)
        token = logits[:, -1, :vocab_size].argmax(-1, keepdim=True)
        for _ in range(decode_steps):
            t = time.perf_counter()
            logits = model(token, state=state, logits_to_keep=1).logits
            decode.append(time.perf_counter() - t)
            token = logits[:, -1, :vocab_size].argmax(-1, keepdim=True)
    return {"prefill_s": statistics.median(prefill), "decode_ms_per_token": 1000 * statistics.median(decode)}


def state_bytes(model: HybridLM, context: int) -> int:
    """Bytes of the inference state holding ``context`` tokens (batch 1, float32): KV cache grows, SSM fixed."""
    return model.init_state(1, max_len=context, device="meta").total_nbytes()


def _eval_batch(length: int) -> int:
    return max(1, min(16, 32768 // length))


def runs(settings: CompareSettings) -> list[tuple[str, int, float]]:
    """The (family, d_model, lr) runs to train: each family at ``d_model`` (or each of ``widths``) and ``lr`` (or
    each of ``lrs``)."""
    return [(f, w, lr) for w in (settings.widths or [settings.d_model]) for f in settings.families
            for lr in (settings.lrs or [settings.lr])]


def run_name(family: str, d_model: int, settings: CompareSettings, lr: float | None = None) -> str:
    """The run's directory and key: the family, with its width and learning rate when the comparison sweeps them."""
    name = f"{family}-d{d_model}" if settings.widths else family
    return f"{name}-lr{lr:g}" if settings.lrs else name


def best_runs(trained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (family, width), in first-seen order: the learning rate with the best mean accuracy over
    the evaluation lengths (then the lower final loss); each carries ``lr_sweep``, every rate's mean accuracy."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in trained:
        groups.setdefault((r["family"], r["d_model"]), []).append(r)

    def mean_accuracy(r: dict[str, Any]) -> float:
        return sum(r["accuracy"].values()) / len(r["accuracy"])

    chosen = []
    for group in groups.values():
        best = max(group, key=lambda r: (mean_accuracy(r), -(r["final_train_loss"] or 0.0)))
        chosen.append({**best, "lr_sweep": {f"{r['lr']:g}": mean_accuracy(r) for r in group}})
    return chosen


def train_family(family: str, settings: CompareSettings, out_dir: Path, progress: bool = True,
                 d_model: int | None = None, lr: float | None = None) -> tuple[HybridLM, dict[str, Any]]:
    """Train ``family`` (at width ``d_model`` and learning rate ``lr``, default ``settings.d_model`` and
    ``settings.lr``) on the task and score it at every evaluation length; returns the model and its results (the
    run, with its checkpoint, is written to ``out_dir / run_name(...)``)."""
    task = get_task(settings.task, **settings.task_params)
    d_model, lr = d_model or settings.d_model, lr or settings.lr
    name = run_name(family, d_model, settings, lr)
    config = family_config(family, d_model, settings.n_layers, task.vocab_size, settings.n_heads)
    scale = settings.batch_scale(family)
    steps, batch_size = max(1, settings.steps // scale), settings.batch_size * scale
    # The warm-up stays in steps, not tokens: it lets Adam's moment estimates settle, which takes steps whatever the
    # batch. On MQAR (4 pairs, d_model 64, 600 steps of 256) the Transformer with 25 warm-up steps stayed on the
    # plateau of guessing among the 4 values (accuracy 25%, at lr 3e-3 and 1e-2, 8 heads or 1); with 100 it
    # reached 99.8% (two seeds, constant or cosine lr).
    train_config = TrainConfig(steps=steps, batch_size=batch_size, seq_len=settings.train_length,
                               lr=lr, warmup_steps=min(settings.warmup_steps, steps),
                               seed=settings.seed, eval_every=0, eval_batches=2, log_every=max(1, steps // 20),
                               weight_decay=settings.weight_decay, beta2=0.98)
    source = TaskSource(task, settings.train_length, seed=settings.seed, short_length=settings.curriculum_length,
                        short_steps=settings.short_steps // scale)
    if progress:
        print(f"[{name}] {config.summary()}; {steps} steps of {batch_size} sequences", file=sys.stderr)
    t = time.perf_counter()
    result = train(config, train_config, source, out_dir / name, progress=progress)
    train_s = time.perf_counter() - t
    model = result.model.eval()
    losses = [r["loss"] for r in result.history if "loss" in r]
    accuracy = {}
    t = time.perf_counter()
    for length in settings.eval_lengths:
        s = task_accuracy(model, task, length, n_samples=settings.eval_samples, batch_size=_eval_batch(length),
                          seed=settings.seed + 1)
        accuracy[str(length)] = s.accuracy
    eval_s = time.perf_counter() - t
    return model, {
        "family": family, "run": name, "d_model": d_model, "lr": lr, "label": LABELS[family], "layers": config.layers,
        "ffn": config.ffn_pattern,
        "config": config.to_dict(), "parameters": model.num_parameters(),
        "train_steps": steps, "train_batch_size": batch_size,
        "train_seconds": train_s, "train_tokens_per_s": result.train_tokens_per_s,
        "final_train_loss": losses[-1] if losses else None, "eval_seconds": eval_s, "accuracy": accuracy,
    }


def measure_family(model: HybridLM, settings: CompareSettings) -> dict[str, Any]:
    """Prefill and decode speed (batch 1) and inference-state bytes of ``model`` at every context."""
    vocab_size = get_task(settings.task, **settings.task_params).vocab_size
    measure_speed(model, min(settings.contexts), 1, vocab_size)  # warm-up (allocations, kernels)
    return {
        "speed": {str(c): measure_speed(model, c, settings.decode_steps, vocab_size) for c in settings.contexts},
        "state_bytes": {str(c): state_bytes(model, c) for c in sorted({*settings.contexts, *settings.eval_lengths})},
    }


def _set_threads(threads: int) -> int:
    """Set torch's intra-op thread count; returns the previous one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def _exit_with_parent() -> None:
    """Pool initializer: end this worker when the process that started it dies. A killed ``compare`` would
    otherwise leave its workers training to the end, holding the cores (the pool only stops idle workers)."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _train_in_child(family: str, d_model: int, lr: float, settings: CompareSettings, out_dir: Path,
                    progress: bool) -> dict[str, Any]:
    from hybridlm.bench.runner import set_threads

    set_threads(settings.threads)
    return train_family(family, settings, out_dir, progress, d_model, lr)[1]


def _measure_in_child(name: str, settings: CompareSettings, out_dir: Path) -> dict[str, Any]:
    from hybridlm.bench.runner import set_threads
    from hybridlm.train import checkpoint_path

    set_threads(settings.threads)
    return measure_family(HybridLM.from_pretrained(checkpoint_path(out_dir / name)).eval(), settings)


def _run_isolated(settings: CompareSettings, out_dir: Path, progress: bool) -> list[dict[str, Any]]:
    """Every family in fresh processes: trained ``settings.workers`` at a time (a process each, so that no
    thread pool of one slows another and each gets the same thread count, numba's included), then measured
    one at a time, so that no timing shares the machine with another family's training."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    os.environ.update({k: str(settings.threads) for k in saved})  # read by the children at import
    context = multiprocessing.get_context("spawn")
    bars = progress and settings.workers == 1  # concurrent progress bars would garble one terminal
    try:
        with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_exit_with_parent) as pool:
            # The Transformer last: it trains fastest, so it fills in beside the slower SSMs.
            order = sorted(runs(settings), key=lambda run: settings.batch_scale(run[0]))
            jobs = {pool.submit(_train_in_child, f, w, lr, settings, out_dir, bars): run_name(f, w, settings, lr)
                    for f, w, lr in order}
            trained = {}
            for job in as_completed(jobs):
                r = trained[jobs[job]] = job.result()
                if progress and not bars:
                    print(f"[{r['run']}] trained in {r['train_seconds']:.0f} s, final loss "
                          f"{r['final_train_loss']:.2e}; accuracy by length: "
                          + ", ".join(f"{n}: {100 * a:.1f}%" for n, a in r["accuracy"].items()), file=sys.stderr)
        chosen = best_runs([trained[run_name(f, w, settings, lr)] for f, w, lr in runs(settings)])
        with ProcessPoolExecutor(1, mp_context=context, initializer=_exit_with_parent) as pool:
            return [{**r, **pool.submit(_measure_in_child, r["run"], settings, out_dir).result()} for r in chosen]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare(settings: CompareSettings, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the comparison and write ``results.json``, ``report.md`` and plots to ``out_dir``; returns the results."""
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # The runs (checkpoints, metrics) go to a fresh directory that replaces ``runs/`` only once every family
    # is done: a second comparison into the same directory starts clean, and a failed one leaves the last.
    run_dir = Path(tempfile.mkdtemp(prefix=".runs-", dir=out_dir))
    try:
        if settings.isolate:
            families = _run_isolated(settings, run_dir, progress)
        else:
            restore = _set_threads(settings.threads)
            try:
                trained = {}
                for f, w, lr in runs(settings):
                    model, result = train_family(f, settings, run_dir, progress, w, lr)
                    trained[result["run"]] = model, result
                families = [{**r, **measure_family(trained[r["run"]][0], settings)}
                            for r in best_runs([r for _, r in trained.values()])]
            finally:
                _set_threads(restore)
        if (out_dir / "runs").exists():
            shutil.rmtree(out_dir / "runs")
        os.replace(run_dir, out_dir / "runs")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    results = {
        "settings": asdict(settings), "families": families,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": settings.threads, "torch": torch.__version__,
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "python": platform.python_version()},
        "total_seconds": time.perf_counter() - started,
    }
    from hybridlm.compare_report import write_outputs

    write_outputs(results, out_dir)
    return results

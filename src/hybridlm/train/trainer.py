"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast, DDP, eval, checkpoints.

Determinism: the model is initialised from ``seed``, the data sources are stateless functions of (seed, step,
sample index), and a checkpoint restores weights, optimizer moments and generator states, so a run resumed at
step k computes the same losses as one that was never interrupted (same machine, same thread count).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hybridlm.atomic_files import atomic_write_text
from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.train import checkpoint as ckpt
from hybridlm.train import fsdp
from hybridlm.train.config import RESUMABLE_CHANGES, TrainConfig
from hybridlm.train.distributed import Distributed, setup
from hybridlm.train.objective import NextTokenLoss, Objective, batch_to

CHECKPOINT_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"


class BatchSource(Protocol):
    vocab_size: int

    def train_batch(self, step: int, start: int, count: int) -> Any: ...  # what the objective takes
    def eval_batches(self, batch_size: int, n_batches: int): ...
    def describe(self) -> dict[str, Any]: ...


@dataclass
class TrainResult:
    # a HybridLM (with its LoRA adapter when trained with one); under FSDP the consolidated model on the main
    # process and None on the others
    model: nn.Module | None
    out_dir: Path
    step: int  # steps completed
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics lines of this process's run
    train_tokens_per_s: float = 0.0  # mean over the steps run by this call


def checkpoint_path(run_dir: str | Path) -> Path:
    """The checkpoint of a run: ``run_dir/checkpoint`` for an output directory, else ``run_dir`` itself."""
    run_dir = Path(run_dir)
    return run_dir / CHECKPOINT_DIR if (run_dir / CHECKPOINT_DIR).is_dir() else run_dir


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, nor the SSM's A_log, D and dt_bias)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        (decay if p.dim() >= 2 and leaf not in {"A_log", "D", "dt_bias"} else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


def _differences(saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _check_resume(state: dict[str, Any], model_config: ModelConfig, config: TrainConfig, source: BatchSource,
                  objective: Objective, world_size: int, where: Path) -> None:
    problems = _differences(state["model_config"], model_config.to_dict(), frozenset({"name"}))
    problems += _differences(state["train_config"], config.to_dict(), RESUMABLE_CHANGES)
    problems += [f"data {d}" for d in _differences(state["data"], source.describe())]
    saved_objective = state.get("objective", NextTokenLoss(0.0).describe())
    problems += [f"objective {d}" for d in _differences(saved_objective, objective.describe())]
    saved_global = state["global_batch"]
    now_global = config.batch_size * config.grad_accum * world_size
    if saved_global != now_global:
        problems.append(f"global batch (batch_size * grad_accum * processes): checkpoint {saved_global}, "
                        f"now {now_global}")
    if problems:
        raise ValueError(f"resume: {where} was trained with a different configuration; nothing was changed. "
                         f"Differences: " + "; ".join(problems))


class _Stopped(Exception):
    """Raised between steps after a Ctrl-C, once step ``step`` is complete."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


class _StopRequest:
    """Turns the first Ctrl-C into a request honoured between steps (save, then stop); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(model_config: ModelConfig, config: TrainConfig, source: BatchSource, out_dir: str | Path,
          resume: str | Path | None = None, progress: bool = True, tokenizer: Any = None,
          device: str | None = None, extra_state: dict[str, Any] | None = None,
          objective: Objective | None = None, initial_model: nn.Module | None = None,
          files: dict[str, str] | None = None,
          load_model: Callable[[Path], nn.Module] | None = None) -> TrainResult:
    """Train a model of ``model_config`` on ``source`` and write checkpoints and ``metrics.jsonl`` to ``out_dir``.

    ``resume``: a run directory (or its ``checkpoint/``) to continue from; its model and training settings
    must match these (except the settings in ``RESUMABLE_CHANGES``). A first Ctrl-C finishes the current
    step, saves a checkpoint and raises ``KeyboardInterrupt``. Under torchrun, every process runs this.
    ``objective``: what a step minimises (default: the next-token loss, with the MoE balance loss).
    ``initial_model``: the weights to start from (fine-tuning; possibly with a LoRA adapter), instead of a fresh
    initialisation from ``seed``; ``load_model``: how a resumed run reads its checkpoint's model (see
    ``checkpoint.load_checkpoint``); ``files``: text files written into every checkpoint (a chat template).
    """
    out_dir = Path(out_dir)
    if source.vocab_size > model_config.vocab_size:
        raise ValueError(f"data: token ids reach {source.vocab_size - 1}, beyond the model's vocab_size "
                         f"{model_config.vocab_size}")
    dist = setup(device)
    kernels = fsdp.torch_kernels() if config.fsdp and dist.world_size > 1 else contextlib.nullcontext()
    try:
        objective = objective or NextTokenLoss(model_config.moe_aux_loss_coef)
        with kernels:
            result = _train(model_config, config, source, out_dir, resume, progress, tokenizer, dist,
                            extra_state or {}, objective, initial_model, files or {}, load_model)
        dist.barrier()  # the main process still evaluates and saves: no process tears the group down before
        return result
    finally:
        dist.close()


def _train(model_config: ModelConfig, config: TrainConfig, source: BatchSource, out_dir: Path,
           resume: str | Path | None, progress: bool, tokenizer: Any, dist: Distributed,
           extra_state: dict[str, Any], objective: Objective, initial_model: nn.Module | None,
           files: dict[str, str], load_model: Callable[[Path], nn.Module] | None) -> TrainResult:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    sharded = config.fsdp and dist.world_size > 1  # one process has nothing to shard across
    if sharded and (initial_model is not None or load_model is not None):
        raise ValueError("fsdp: sharding covers pre-training a HybridLM; fine-tuning (a given initial model or a "
                         "LoRA adapter) runs with DDP")
    if resume is None:
        if (ckpt_dir / ckpt.STATE_NAME).exists():
            raise ValueError(f"out: {out_dir} already holds a training checkpoint; continue it with "
                                  f"--resume {out_dir}, or choose another output directory")
        torch.manual_seed(config.seed)
        model = (HybridLM(model_config) if initial_model is None else initial_model).to(dist.device)
        if sharded:
            fsdp.shard(model)  # every process built the same weights from the seed; each keeps its shard
        optimizer = make_optimizer(model, config)
        start = 0
    else:
        where = checkpoint_path(resume)
        state = ckpt.read_state(where)
        _check_resume(state, model_config, config, source, objective, dist.world_size, where)
        if sharded:
            ckpt.verify_checksums(where, state)
            model = fsdp.shard(HybridLM.from_pretrained(where, device=dist.device, format="hybridlm"))
            optimizer = make_optimizer(model, config)
            fsdp.load_optimizer(model, optimizer, state["optimizer_param_groups"], ckpt.read_optimizer_tensors(where))
            ckpt.restore_rng(where)
        else:
            model, optimizer, state = ckpt.load_checkpoint(where, lambda m: make_optimizer(m, config), dist.device,
                                                           load_model)
        start = state["step"]
        if start > config.steps:
            raise ValueError(f"steps: the checkpoint in {where} is already at step {start}; give --steps >= {start}")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out_dir / METRICS_NAME, start)

    wrapped: nn.Module = model
    if dist.world_size > 1 and not sharded:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    model.train()
    tokens_per_step = config.batch_size * config.grad_accum * dist.world_size * config.seq_len
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.bf16)
    history: list[dict[str, Any]] = []
    bar = _progress_bar(config.steps, start, enabled=progress and dist.is_main)
    run_state = {"model_config": model_config.to_dict(), "train_config": config.to_dict(), "data": source.describe(),
                 "global_batch": config.batch_size * config.grad_accum * dist.world_size,
                 "objective": objective.describe(), **extra_state}

    def save(step: int) -> HybridLM | None:
        """Write the checkpoint; under FSDP returns the model gathered for it (on the main process)."""
        if sharded:  # every process takes part in gathering the full state; the main one writes it
            plain, groups, tensors = fsdp.gather(model, optimizer)
            if dist.is_main:
                ckpt.save_checkpoint(ckpt_dir, plain, None, {**run_state, "step": step}, tokenizer=tokenizer,
                                     files=files, optimizer_state=(groups, tensors))
            return plain
        if dist.is_main:
            ckpt.save_checkpoint(ckpt_dir, model, optimizer, {**run_state, "step": step}, tokenizer=tokenizer,
                                 files=files)
        return None

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if dist.is_main:
            with (out_dir / METRICS_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")

    t_start = time.perf_counter()
    t_window, window_tokens = t_start, 0
    with _StopRequest() as stop:
        try:
            for step in range(start, config.steps):
                lr = config.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                metric_sums: dict[str, torch.Tensor] = {}
                for micro in range(config.grad_accum):
                    first = (dist.rank * config.grad_accum + micro) * config.batch_size
                    batch = batch_to(source.train_batch(step, first, config.batch_size), dist.device)
                    sync = micro == config.grad_accum - 1 or dist.world_size == 1
                    if sharded:
                        model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last only
                    with (contextlib.nullcontext() if sync or sharded else wrapped.no_sync()), autocast:
                        loss, metrics = objective(wrapped, batch)
                    (loss / config.grad_accum).backward()
                    for name, value in metrics.items():
                        metric_sums[name] = metric_sums.get(name, 0.0) + value.float()
                max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
                grad_norm = fsdp.norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                window_tokens += tokens_per_step
                if done % config.log_every == 0 or done == config.steps or done == start + 1:
                    means = {name: float(dist.mean(total / config.grad_accum)) for name, total in metric_sums.items()}
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - t_window, 1e-9)
                    t_window, window_tokens = now, 0
                    log({"step": done, "loss": means.pop("loss"), **means, "lr": lr, "grad_norm": grad_norm,
                         "tokens": done * tokens_per_step, "tok_per_s": round(tok_s, 1),
                         "elapsed_s": round(now - t_start, 3)})
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                # under FSDP every process runs the model's forward (its all-gathers), so every process evaluates
                evaluate = config.eval_every and done % config.eval_every == 0 or done == config.steps
                if (dist.is_main or sharded) and evaluate:
                    batches = source.eval_batches(config.batch_size, config.eval_batches)
                    log({"step": done, **objective.evaluate(model, batches)})
                if config.save_every and done % config.save_every == 0 and done != config.steps:
                    save(done)
                if stop.requested:
                    raise _Stopped(done)
        except _Stopped as e:
            bar.close()
            save(e.step)
            if dist.is_main:
                print(f"\ninterrupted: saved a checkpoint at step {e.step} to {ckpt_dir}; continue with "
                      f"--resume {out_dir}", file=sys.stderr)
            raise KeyboardInterrupt from None
    bar.close()
    gathered = save(config.steps) if config.steps > start else None
    elapsed = time.perf_counter() - t_start
    ran = config.steps - start
    if sharded:  # the shards die with the process group; the caller gets the whole model (on the main process)
        model = gathered if config.steps > start else fsdp.consolidate(model)
    return TrainResult(model=model, out_dir=out_dir, step=config.steps, history=history,
                       train_tokens_per_s=ran * tokens_per_step / elapsed if ran and elapsed > 0 else 0.0)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _progress_bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; keep running without a bar if it is missing
        enabled = False
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...

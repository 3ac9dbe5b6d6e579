"""TrainConfig: every setting of a training run, and the learning-rate schedule (linear warm-up, cosine decay)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Settings a resumed run may change without changing what it computes (logging and saving cadence) or that
# extend it (steps: note that the cosine schedule follows the new total); fsdp: how the work is spread over
# processes (checkpoints are consolidated either way), not what is computed.
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "eval_batches", "log_every", "save_every", "fsdp"})


@dataclass
class TrainConfig:
    """``batch_size`` is per process and micro-batch: a step trains on ``batch_size * grad_accum * world_size``
    sequences of ``seq_len`` tokens."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bfloat16 autocast for the forward pass (weights and optimizer stay float32)
    seed: int = 0
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 4
    save_every: int = 0  # 0: at the end (and on Ctrl-C) only
    log_every: int = 10
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected a positive number, got {self.lr!r}")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1 + (name == "min_lr_ratio"):
                raise ValueError(f"TrainConfig.{name}: expected a number in [0, 1], got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"TrainConfig.weight_decay/grad_clip: expected numbers >= 0, got "
                             f"{self.weight_decay!r}, {self.grad_clip!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then cosine down to
        ``lr * min_lr_ratio`` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

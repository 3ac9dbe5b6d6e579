"""Where training batches come from: windows of a token file, or a synthetic task. Both are *stateless*: the
sample with global index ``j`` of step ``k`` depends only on (seed, k, j), so resuming at step k needs no
saved data position beyond k, and any split of a step's samples over processes and accumulation
micro-batches trains on exactly the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hybridlm.data.tasks import Task

TRAIN, EVAL = 0, 1  # streams of the seeded generator


class TextSource:
    """Random windows of ``seq_len`` tokens from the training part of ``tokens``; the last ``eval_fraction`` of
    the tokens (at least one window) is held out for eval loss. Every position of a window is scored."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, eval_fraction: float = 0.01,
                 info: dict[str, Any] | None = None) -> None:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a number in (0, 1), got {eval_fraction!r}")
        n = len(tokens)
        n_eval = max(math.ceil(n * eval_fraction), seq_len)
        if n - n_eval < seq_len:
            raise ValueError(f"seq_len: {seq_len} is longer than the data allows: the corpus has {n:,} tokens, "
                             f"and training and the held-out split each need at least seq_len tokens "
                             f"(give seq_len <= {n // 2:,} or more text)")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_train = n - n_eval
        self.vocab_size = int(tokens.max()) + 1
        self.info = dict(info or {})

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.stack([np.asarray(self.tokens[s : s + self.seq_len], dtype=np.int64)
                                         for s in starts]))
        return ids, ids

    def train_batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+count-1`` of step ``step``: (input_ids, labels), each (count, seq_len)."""
        rng = np.random.default_rng([self.seed, TRAIN, step])
        starts = rng.integers(0, self.n_train - self.seq_len + 1, size=start + count)[start:]
        return self._windows(starts)

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``n_batches`` batches of non-overlapping held-out windows, always the same ones."""
        starts = np.arange(self.n_train, len(self.tokens) - self.seq_len + 1, self.seq_len)
        for i in range(0, min(len(starts), batch_size * n_batches), batch_size):
            yield self._windows(starts[i : i + batch_size])

    def describe(self) -> dict[str, Any]:
        """What the samples depend on: compared when a run resumes."""
        return {"kind": "text", "n_tokens": int(len(self.tokens)), "seq_len": self.seq_len, "seed": self.seed,
                "n_train": self.n_train, **self.info}


class TaskSource:
    """Sequences of ``seq_len`` tokens of a synthetic task, freshly drawn for every step.

    A length curriculum: during the first ``short_steps`` steps each sample is ``seq_len // short_length``
    sequences of ``short_length`` tokens instead of one of ``seq_len`` (the same tokens per step, and a
    sample's sequences still depend only on (seed, step, index)). A short warm-up lets a model find the
    mechanism where it is cheap to find; the full length then trains it to hold it over longer spans.
    """

    def __init__(self, task: Task, seq_len: int, seed: int = 0, short_length: int | None = None,
                 short_steps: int = 0) -> None:
        task.sample(1, seq_len, np.random.default_rng(0))  # a clear error now if seq_len is too short
        if short_length is not None:
            if not isinstance(short_length, int) or short_length < 1 or seq_len % short_length:
                raise ValueError(f"short_length: expected a divisor of seq_len={seq_len}, got {short_length!r}")
            task.sample(1, short_length, np.random.default_rng(0))
        if not isinstance(short_steps, int) or short_steps < 0:
            raise ValueError(f"short_steps: expected an integer >= 0, got {short_steps!r}")
        self.task, self.seq_len, self.seed = task, seq_len, seed
        self.short_length, self.short_steps = short_length, short_steps if short_length else 0
        self.vocab_size = task.vocab_size

    def _draw(self, stream: int, index: int, start: int, count: int, length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        length = length or self.seq_len
        batches = [self.task.sample(1, length, np.random.default_rng([self.seed, stream, index, j]))
                   for j in range(start, start + count)]
        return torch.cat([b.input_ids for b in batches]), torch.cat([b.labels for b in batches])

    def train_batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+count-1`` of step ``step``: (count, seq_len) tensors, or during the short
        steps (count * seq_len // short_length, short_length)."""
        if step < self.short_steps:
            k = self.seq_len // self.short_length
            return self._draw(TRAIN, step, start * k, count * k, self.short_length)
        return self._draw(TRAIN, step, start, count)

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(n_batches):
            yield self._draw(EVAL, i, 0, batch_size)

    def describe(self) -> dict[str, Any]:
        curriculum = {"short_length": self.short_length, "short_steps": self.short_steps} if self.short_steps else {}
        return {"kind": "task", "task": self.task.describe(), "seq_len": self.seq_len, "seed": self.seed,
                **curriculum}

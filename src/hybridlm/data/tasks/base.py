"""What every synthetic task provides: seeded batches of token ids with labels only on the answer positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # label of positions that are not scored (the model's cross-entropy ignore_index)


@dataclass
class TaskBatch:
    """``input_ids`` (b, length) int64; ``labels`` (b, length): ``IGNORE`` except at answer positions, where it
    is the answer: the token itself where the answer is part of the text (induction heads, selective copying), or
    a token the input does not show (MQAR's queried values). As for ``HybridLM.forward``, the output at position
    t - 1 is scored on ``labels[:, t]``, so an answer is predicted from everything before it."""

    input_ids: torch.Tensor
    labels: torch.Tensor


class Task:
    """A synthetic sequence task. Subclasses set ``name``, ``vocab_size``, ``min_length`` and write ``_generate``."""

    name: str = ""
    params: tuple[str, ...] = ()  # constructor arguments, recorded by describe()
    vocab_size: int = 0
    min_length: int = 1

    def sample(self, batch_size: int, length: int, rng: np.random.Generator) -> TaskBatch:
        """``batch_size`` sequences of exactly ``length`` tokens drawn from ``rng`` (same rng state, same batch)."""
        if not isinstance(length, int) or length < self.min_length:
            raise ValueError(f"length: task {self.name!r} needs sequences of at least {self.min_length} tokens, "
                             f"got {length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        tokens = np.empty((batch_size, length), dtype=np.int64)
        labels = np.empty((batch_size, length), dtype=np.int64)
        for i in range(batch_size):
            tokens[i], labels[i] = self._generate(length, rng)
        return TaskBatch(torch.from_numpy(tokens), torch.from_numpy(labels))

    def scored_task(self) -> Task:
        """The task that accuracy is measured on: this one, unless training mixes in easier sequences (MQAR's
        ``min_pairs``), in which case the task at full difficulty."""
        return self

    def _generate(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # -> input tokens (length,) int64, labels (length,) int64: IGNORE except at the answers
        raise NotImplementedError

    def describe(self) -> dict:
        """The task's name and parameters (JSON-able): enough to rebuild it with ``get_task``."""
        return {"name": self.name, **{k: getattr(self, k) for k in self.params}}

"""Batches of SFT examples: each one alone, right-padded (the default), or packed into full rows.

Labels are the ids where a token is trained and -100 elsewhere (the prompt, the padding), so the language-model
loss of ``HybridLM.forward`` is the completion-only loss. Right padding never changes what a causal model
computes for the real tokens before it, so no attention mask is needed. Like the other sources this one is
stateless: sample ``j`` of step ``k`` depends only on (seed, k, j).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hybridlm.data.chat_examples import SFTExample
from hybridlm.data.source import TRAIN

IGNORE = -100


class SFTSource:
    """``train``/``held_out``: tokenized examples; each is cut to ``seq_len`` tokens. ``packing``: the examples
    (in order) are joined into one stream cut into rows of ``seq_len`` tokens, so no position is padding."""

    def __init__(self, train: list[SFTExample], held_out: list[SFTExample], seq_len: int, pad_id: int,
                 seed: int = 0, packing: bool = False, info: dict[str, Any] | None = None) -> None:
        if not train:
            raise ValueError("data: no training examples")
        if not held_out:
            raise ValueError("eval data: no held-out examples")
        self.seq_len, self.pad_id, self.seed, self.packing = seq_len, pad_id, seed, packing
        self.train_rows = self._rows(train)
        self.eval_rows = self._rows(held_out)
        if not any(bool((labels != IGNORE).any()) for _, labels in self.train_rows):
            raise ValueError(f"data: no trained token within seq_len={seq_len} of any example; raise --seq-len")
        self.vocab_size = 1 + max(max(int(ids.max()) for ids, _ in self.train_rows + self.eval_rows), pad_id)
        self.info = {"n_train": len(train), "n_eval": len(held_out), "packing": packing, **(info or {})}

    def _rows(self, examples: list[SFTExample]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # each (ids (n,), labels (n,)) with n <= seq_len; packed rows are all seq_len (the last may be shorter)
        pairs = [(torch.tensor(e.ids), torch.where(torch.tensor(e.trained), torch.tensor(e.ids), IGNORE))
                 for e in examples]
        if not self.packing:
            return [(ids[: self.seq_len], labels[: self.seq_len]) for ids, labels in pairs]
        ids, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return [(ids[s : s + self.seq_len], labels[s : s + self.seq_len]) for s in range(0, len(ids), self.seq_len)]

    def batch(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (ids, labels) right-padded into one batch.
        -> input_ids, labels: (len(rows), longest row)"""
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)], labels[r, : len(lab)] = ids, lab
        return input_ids, labels

    def train_batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+count-1`` of step ``step``, drawn with replacement."""
        rng = np.random.default_rng([self.seed, TRAIN, step])
        picks = rng.integers(0, len(self.train_rows), size=start + count)[start:]
        return self.batch([self.train_rows[i] for i in picks])

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out rows in order, up to ``n_batches`` batches (0: all of them)."""
        n = len(self.eval_rows) if n_batches == 0 else min(len(self.eval_rows), batch_size * n_batches)
        for i in range(0, n, batch_size):
            yield self.batch(self.eval_rows[i : i + batch_size])

    def describe(self) -> dict[str, Any]:
        return {"kind": "sft", "seq_len": self.seq_len, "seed": self.seed, **self.info}

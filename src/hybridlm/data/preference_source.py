"""Batches of preference pairs: for n pairs, 2n right-padded rows, the n chosen sequences then the n rejected.

A row is prompt + completion; its labels are the completion's ids and -100 over the prompt and the padding, so
a sequence's log-probability is the sum over its completion tokens only. ``pair_index`` says which pair each of
the n came from (the key of precomputed reference log-probs). Sequences longer than ``seq_len`` lose the end
of their completion (TRL's ``keep_start``); a pair whose prompt alone fills ``seq_len`` is dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from hybridlm.data.chat_examples import PreferencePair
from hybridlm.data.source import TRAIN

IGNORE = -100


class PreferenceBatch(NamedTuple):
    input_ids: torch.Tensor  # (2n, l): chosen rows, then rejected rows
    labels: torch.Tensor  # (2n, l): completion ids, -100 elsewhere
    pair_index: torch.Tensor  # (n,): the pairs' indices in their split (train or held out)
    held_out: torch.Tensor  # (): 1 for held-out pairs

    def to(self, device: torch.device) -> PreferenceBatch:
        return PreferenceBatch(*(t.to(device) for t in self))


class PreferenceSource:
    def __init__(self, train: list[PreferencePair], held_out: list[PreferencePair], seq_len: int, pad_id: int,
                 seed: int = 0, info: dict[str, Any] | None = None) -> None:
        self.seq_len, self.pad_id, self.seed = seq_len, pad_id, seed
        self.train_pairs, self.eval_pairs = self._fitting(train, "data"), self._fitting(held_out, "eval data")
        ids = [t for p in self.train_pairs + self.eval_pairs for t in (*p.prompt, *p.chosen, *p.rejected)]
        self.vocab_size = 1 + max(max(ids), pad_id)
        self.info = {"n_train": len(self.train_pairs), "n_eval": len(self.eval_pairs), **(info or {})}

    def _fitting(self, pairs: list[PreferencePair], what: str) -> list[PreferencePair]:
        kept = [p for p in pairs if len(p.prompt) < self.seq_len and p.chosen and p.rejected]
        if len(kept) < len(pairs):
            warnings.warn(f"{what}: {len(pairs) - len(kept)} of {len(pairs)} pairs dropped: the prompt fills "
                          f"seq_len={self.seq_len} or a completion is empty", stacklevel=3)
        if not kept:
            raise ValueError(f"{what}: no preference pair fits in seq_len={self.seq_len}")
        return kept

    def batch(self, pairs: list[PreferencePair], indices: list[int], held_out: bool) -> PreferenceBatch:
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        width = min(self.seq_len, max(len(a) + len(b) for a, b in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            seq = torch.tensor((prompt + completion)[:width])
            input_ids[r, : len(seq)] = seq
            labels[r, len(prompt) : len(seq)] = seq[len(prompt) :]
        return PreferenceBatch(input_ids, labels, torch.tensor(indices), torch.tensor(int(held_out)))

    def train_batch(self, step: int, start: int, count: int) -> PreferenceBatch:
        """Pairs ``start .. start+count-1`` of step ``step``, drawn with replacement."""
        rng = np.random.default_rng([self.seed, TRAIN, step])
        picks = [int(i) for i in rng.integers(0, len(self.train_pairs), size=start + count)[start:]]
        return self.batch([self.train_pairs[i] for i in picks], picks, held_out=False)

    def eval_batches(self, batch_size: int, n_batches: int) -> Iterator[PreferenceBatch]:
        """The held-out pairs in order, up to ``n_batches`` batches (0: all of them)."""
        n = len(self.eval_pairs) if n_batches == 0 else min(len(self.eval_pairs), batch_size * n_batches)
        for i in range(0, n, batch_size):
            idx = list(range(i, min(i + batch_size, n)))
            yield self.batch([self.eval_pairs[j] for j in idx], idx, held_out=True)

    def all_batches(self, batch_size: int) -> Iterator[PreferenceBatch]:
        """Every pair once, training then held out (to precompute reference log-probs)."""
        for pairs, held_out in ((self.train_pairs, False), (self.eval_pairs, True)):
            for i in range(0, len(pairs), batch_size):
                idx = list(range(i, min(i + batch_size, len(pairs))))
                yield self.batch([pairs[j] for j in idx], idx, held_out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "preference", "seq_len": self.seq_len, "seed": self.seed, **self.info}

"""Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927), in Zoology's format: key-value
pairs first, then each key asked again later among filler; after a queried key the model must produce that key's
value, which the input never shows there (the slot after the key holds filler, the value is only the label).
Keys come from the first half of the vocabulary, values from the second (token 0 is the filler).

    input:  k1 v1 k2 v2 k3 v3 | 0 0 k2 0 0 k1 0 0 0 0 k3 0 0
    labels:                          v2      v1          v3

Why the value stays out of the input: with it written after each query (as text would read), earlier answers
narrow the candidates for later ones, and a Transformer settles on that shortcut instead of recall. With 4 pairs,
guessing among the values not yet answered scores (1/4 + 1/3 + 1/2 + 1) / 4 = 52%, where a 2-layer Transformer
(d_model 64) sat for 3,000 steps of 64 and 450 of 256; in this format it reached 99% in 750 steps of 256.
"""

from __future__ import annotations

import numpy as np

from hybridlm.data.tasks.base import IGNORE, Task


class MQAR(Task):
    """``n_pairs`` distinct keys from ``1 .. vocab_size/2 - 1`` and distinct values from ``vocab_size/2 ..
    vocab_size-1`` (Zoology draws both without replacement). Each key is queried once, in random order, at
    uniformly random places in the rest of the sequence (Zoology draws the gaps from a power law that favours early
    queries; uniform places make long-range recall count as much as short).

    ``min_pairs``: train on a mix, each sequence holding between ``min_pairs`` and ``n_pairs`` pairs (uniformly),
    and no more than fit (``length // 4``), so that a length curriculum (compare's ``--short-length``) starts on
    fewer pairs: Zoology trains one model on 4 pairs at 64 tokens up to 64 pairs at 256 (its
    ``original_mqar_configs``). ``min_pairs == n_pairs``: as many as fit, up to ``n_pairs``. Scoring
    (``scored_task``) always uses ``n_pairs``."""

    name = "mqar"
    params = ("vocab_size", "n_pairs", "min_pairs")

    def __init__(self, vocab_size: int = 64, n_pairs: int = 8, min_pairs: int | None = None) -> None:
        if n_pairs < 1:
            raise ValueError(f"n_pairs: expected >= 1, got {n_pairs}")
        if min_pairs is not None and not 1 <= min_pairs <= n_pairs:
            raise ValueError(f"min_pairs: expected 1 <= min_pairs <= n_pairs ({n_pairs}), got {min_pairs}")
        if vocab_size // 2 - 1 < n_pairs:
            raise ValueError(f"vocab_size: {n_pairs} distinct keys need vocab_size >= {2 * n_pairs + 2}, "
                             f"got {vocab_size}")
        self.vocab_size = vocab_size
        self.n_pairs = n_pairs
        self.min_pairs = min_pairs
        self.filler = 0
        self.min_length = 4 * n_pairs if min_pairs is None else 4

    def scored_task(self) -> MQAR:
        return self if self.min_pairs is None else MQAR(self.vocab_size, self.n_pairs)

    def _generate(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        half = self.vocab_size // 2
        if self.min_pairs is None:
            n = self.n_pairs
        else:
            fit = length // 4  # each pair takes two tokens, and its query two more
            n = int(rng.integers(min(self.min_pairs, fit), min(self.n_pairs, fit) + 1))
        keys = rng.choice(np.arange(1, half), size=n, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=n, replace=False)
        tokens = np.full(length, self.filler, dtype=np.int64)
        tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2] = keys, values
        # n query slots of two tokens each in the rest: choose n slot starts among the free positions
        # so that no two overlap (pick from a shrunk range, then spread out by one per earlier query).
        free = length - 2 * n
        starts = np.sort(rng.choice(free - n, size=n, replace=False)) + np.arange(n) + 2 * n
        order = rng.permutation(n)
        tokens[starts] = keys[order]  # the slot after the key keeps the filler
        labels = np.full(length, IGNORE, dtype=np.int64)
        labels[starts + 1] = values[order]
        return tokens, labels

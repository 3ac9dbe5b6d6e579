"""Selective copying (Mamba paper, arXiv 2312.00752, section 3.1 and Table 1; the S4 copying task with the tokens
to remember placed at random positions): ``n_tokens`` data tokens scattered among noise, then a separator, then
the data tokens again in order. Only content-aware (selective) models can skip the noise.

    . a . . b . . . c . . d | SEP a b c d
                                  └─┴─┴─┴ answers, each predicted from everything before it
"""

from __future__ import annotations

import numpy as np

from hybridlm.data.tasks.base import IGNORE, Task


class SelectiveCopy(Task):
    """Token 0 is noise, 1 the separator, ``2 .. vocab_size-1`` data. The Mamba paper's setting is 16 tokens
    to copy, vocabulary 16, length 4096; ``compare`` scales the length down."""

    name = "selective_copy"
    params = ("vocab_size", "n_tokens")

    def __init__(self, vocab_size: int = 16, n_tokens: int = 16) -> None:
        if vocab_size < 3:
            raise ValueError(f"vocab_size: expected >= 3 (noise, separator, data), got {vocab_size}")
        if n_tokens < 1:
            raise ValueError(f"n_tokens: expected >= 1, got {n_tokens}")
        self.vocab_size = vocab_size
        self.n_tokens = n_tokens
        self.noise, self.separator = 0, 1
        self.min_length = 2 * n_tokens + 1

    def _generate(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_tokens
        body_len = length - 1 - n
        data = rng.integers(2, self.vocab_size, size=n)
        body = np.full(body_len, self.noise, dtype=np.int64)
        body[np.sort(rng.choice(body_len, size=n, replace=False))] = data
        tokens = np.concatenate([body, [self.separator], data])
        labels = np.full(length, IGNORE, dtype=np.int64)
        labels[-n:] = tokens[-n:]
        return tokens, labels

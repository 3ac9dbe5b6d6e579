"""Induction heads, as the Mamba paper uses it (Gu & Dao 2023, arXiv 2312.00752, section 4.1.2 / Table 11), from
the definition in HazyResearch/safari (``generate_induction_head``): a vocabulary of 16 (14 ordinary tokens, a
trigger and a no-op), a random sequence in which a trigger is followed by some token, and at the end the
trigger again: the model must answer the token that followed the trigger earlier, wherever that was.

    t t t t ... TRIGGER a t t t ... t t TRIGGER | a
                                               └ answer (the only scored position)
"""

from __future__ import annotations

import numpy as np

from hybridlm.data.tasks.base import IGNORE, Task


class InductionHeads(Task):
    """Tokens ``0 .. vocab_size-3`` are ordinary, ``vocab_size-2`` is the trigger, ``vocab_size-1`` the no-op
    (unused here, kept so the vocabulary matches safari's 16). ``induction_len`` tokens follow each trigger.
    ``num_triggers``: with probability 1/2 one earlier trigger, else up to this many (safari's rule)."""

    name = "induction_heads"
    params = ("vocab_size", "induction_len", "num_triggers")

    def __init__(self, vocab_size: int = 16, induction_len: int = 1, num_triggers: int = 1) -> None:
        if vocab_size < 4:
            raise ValueError(f"vocab_size: expected >= 4 (ordinary tokens, trigger, no-op), got {vocab_size}")
        if induction_len < 1 or num_triggers < 1:
            raise ValueError(f"induction_len, num_triggers: expected >= 1, got {induction_len}, {num_triggers}")
        self.vocab_size = vocab_size
        self.induction_len = induction_len
        self.num_triggers = num_triggers
        self.trigger = vocab_size - 2
        self.noop = vocab_size - 1
        # body (>= induction_len + 2 so a trigger fits), final trigger, answer
        self.min_length = 2 * induction_len + 3

    def _generate(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        k = self.induction_len
        body_len = length - 1 - k
        body = rng.integers(0, self.vocab_size - 2, size=body_len)
        n = 1 if rng.uniform() < 0.5 else self.num_triggers
        starts = np.sort(rng.integers(0, body_len - (1 + k), size=n))
        kept = [int(starts[0])]
        for p in starts[1:]:
            if p - kept[-1] > k:  # triggers never overlap the copied tokens of the previous one
                kept.append(int(p))
        copied = body[kept[0] + 1 : kept[0] + 1 + k].copy()
        for p in kept:
            body[p] = self.trigger
            body[p + 1 : p + 1 + k] = copied
        tokens = np.concatenate([body, [self.trigger], copied])
        labels = np.full(length, IGNORE, dtype=np.int64)
        labels[-k:] = tokens[-k:]
        return tokens, labels

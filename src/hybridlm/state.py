"""Inference state of a whole model: one entry per layer (a KV cache or a fixed-size SSM state)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch


class InferenceState:
    """Per-generation state, filled by a prefill and advanced in place by each decode step.

    ``layers[i]`` is the state of layer ``i``'s mixer (a ``KVCache`` or an ``SSMState``; the contract is
    ``layers.mixer.LayerState``);
    ``kinds[i]`` the mixer's kind. ``seqlen`` counts the positions processed so far (padding included).
    """

    def __init__(self, layers: list[Any], kinds: list[str], batch_size: int) -> None:
        self.layers = layers
        self.kinds = kinds
        self.batch_size = batch_size
        self.seqlen = 0
        self.fused_decode: Any = None  # the model's decode kernels bound to this state (hybridlm.decode)

    def select(self, rows: Sequence[int] | torch.Tensor, capacity: int = 0) -> InferenceState:
        """A new state holding sequences ``rows`` of this one, in that order (for continuous batching:
        sequences that finished leave the batch). ``capacity``: KV positions to preallocate (they grow anyway)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < self.batch_size:
            raise ValueError(f"rows: expected indices in [0, {self.batch_size}), got {rows.tolist()}")
        out = InferenceState([s.select(rows, capacity) for s in self.layers], self.kinds, int(rows.numel()))
        out.seqlen = self.seqlen
        return out

    @staticmethod
    def cat(states: Sequence[InferenceState], capacity: int = 0) -> InferenceState:
        """The sequences of ``states`` (of one model, any lengths) stacked into one batch, in order.

        KV caches of different lengths are right-aligned and left-padded, the padding marked invalid; each
        sequence keeps its own RoPE position, so it decodes as it would alone."""
        if not states:
            raise ValueError("states: expected at least one InferenceState, got none")
        kinds = states[0].kinds
        for s in states[1:]:
            if s.kinds != kinds:
                raise ValueError(f"states: expected states of one model (layer kinds {kinds}), got {s.kinds}")
        layers = [type(group[0]).cat(list(group), capacity) for group in zip(*(s.layers for s in states), strict=True)]
        out = InferenceState(layers, kinds, sum(s.batch_size for s in states))
        out.seqlen = max(s.seqlen for s in states)
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by layer kind, e.g. ``{"attention": ..., "mamba": ...}``: KV cache vs fixed state."""
        by_kind: dict[str, int] = defaultdict(int)
        for kind, layer_state in zip(self.kinds, self.layers, strict=True):
            by_kind[kind] += layer_state.nbytes()
        return dict(by_kind)

    def total_nbytes(self) -> int:
        return sum(self.nbytes().values())

    def __repr__(self) -> str:
        return f"InferenceState(batch_size={self.batch_size}, seqlen={self.seqlen}, nbytes={self.nbytes()})"


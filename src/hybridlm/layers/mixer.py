"""The contracts every mixer and its inference state keep, in one place (structural: nothing to inherit).

A mixer is one file under ``layers/``: its module, its state class, the checks of the config fields it reads, its
``describe`` label and prefill FLOP count, and (optionally) its fused decode binding; registering it is one line in
``layers/__init__.py``. The model, the decode module, serving, ``describe`` and the bench use only what is written here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from hybridlm.config import invalid

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig
    from hybridlm.layers.norm import RMSNorm


class LayerState(Protocol):
    """One layer's inference state: a KV cache that grows with the context, or a fixed-size recurrent state."""

    length: int  # context positions seen by a KV cache (a ring buffer holds the last window of them); 0 for a
    # fixed-size state
    bound_tensors: ClassVar[tuple[str, ...]]  # tensors a bound decode step keeps: replacing one makes decode rebind
    # what ``describe`` calls it (a class attribute, or a property where the instance decides): "KV cache",
    # "KV cache (ring buffer of 4096 positions)", "conv + SSM state (fixed size)"
    description: str

    def nbytes(self) -> int:
        """Bytes held now."""

    def nbytes_at(self, context: int) -> int:
        """Bytes held after ``context`` tokens (the bench's memory bound)."""

    def select(self, rows: torch.Tensor, capacity: int = 0) -> LayerState:
        """A new state holding sequences ``rows`` of this one (continuous batching: finished ones leave)."""

    @staticmethod
    def cat(states: Sequence[LayerState], capacity: int = 0) -> LayerState:
        """The states' sequences stacked into one batch (continuous batching: new ones join)."""


class Mixer(Protocol):
    """A sequence mixer: attention, Mamba-1, Mamba-2, ... (an ``nn.Module``)."""

    kind: ClassVar[str]  # groups state bytes and names the family: "attention", "mamba", "mamba2"
    label: ClassVar[str]  # describe's legend: "attention", "Mamba-1", ...

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None: ...

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        """Raise ``ValueError`` (``config.invalid``) for a config this mixer cannot be built from as the mixer of
        ``letter`` (its own options: ``config.mixer_options.get(letter, {})``)."""

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> LayerState:
        """An empty state for ``batch_size`` sequences (``max_len``: KV positions to preallocate)."""

    def forward(self, x: torch.Tensor, state: LayerState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """A whole sequence, (b, l, d_model) -> (b, l, d_model), filling ``state`` when given; ``mask`` (b, l) is
        False at left padding, which must leave the state as if it were absent."""

    def step(self, x: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One decode step in torch ops, (b, 1, d_model) -> (b, 1, d_model), advancing ``state`` in place."""

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token of a ``length``-token prefill beyond the 2 FLOPs per weight of its projections."""


class FusedStep(Protocol):
    """A mixer with a compiled decode step (optional; the decode module looks for ``bind_step``)."""

    def bind_step(self, state: LayerState, norm: RMSNorm | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
        """The block's step ``hidden + mixer(norm(hidden))`` (the mixer alone without ``norm``) as one call on float32
        arrays, (b, d_model) -> (b, d_model), weights and state bound; None where it does not apply."""


Options = TypeVar("Options")


def mixer_options(cls: type[Options], config: ModelConfig, letter: str, mixer: str
                  ) -> tuple[Options, Callable[[str], str]]:
    """A mixer's own options for ``letter`` as the dataclass ``cls`` (from ``config.mixer_options``), an unknown one
    refused with the known ones listed; and the function naming an option in errors (``mixer_options['L'].decay``).
    The caller checks the values."""
    given: dict[str, Any] = config.mixer_options.get(letter, {})
    name = lambda option: f"mixer_options[{letter!r}].{option}"  # noqa: E731
    known = [f.name for f in dataclasses.fields(cls)]
    for option in given:
        if option not in known:
            raise invalid(name(option), f"an option of {mixer} ({', '.join(known)})", option)
    return cls(**given), name

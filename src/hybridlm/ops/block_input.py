"""A block's residual step inside a mixer's fused decode kernel: the kernel normalises its input itself.

Given the block's pre-norm, a decode kernel computes ``hidden + mixer(norm(hidden))``, the block's whole update, in
one call. Between two kernels that have just streamed megabytes of weights, the separate RMSNorm call and the
residual add each met cold caches (~20-30 us a layer, ~0.6 ms a token of mamba-130m) for a few microseconds of
arithmetic inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit
from torch import nn

from hybridlm.ops.numpy_views import numpy_views
from hybridlm.ops.rms_norm_numba import rms_norm_row

if TYPE_CHECKING:
    from hybridlm.layers.norm import RMSNorm

EMPTY = np.zeros(1, dtype=np.float32)  # the kernels' stand-in for an absent bias or norm weight


@njit(cache=True, inline="always")
def block_input(hidden, residual, norm_w, norm_eps):  # pragma: no cover - compiled
    # hidden: (b, d_model) -> the mixer's input: the block's RMSNorm of it for a residual step, else itself
    if not residual:
        return hidden
    x = np.empty_like(hidden)
    for b in range(hidden.shape[0]):
        rms_norm_row(hidden[b], norm_w, norm_eps, x[b])
    return x


def block_arguments(norm: RMSNorm | None) -> tuple | None:
    """The kernels' ``(residual, norm_w, norm_eps)`` arguments for the block's ``norm`` (None: the mixer alone), or
    None when its weight is not a float32 CPU tensor (the caller then takes its torch path)."""
    if norm is None:
        return False, EMPTY, 0.0
    w = numpy_views(norm)
    return None if w is None else (True, w["weight"], norm.eps)


def fused_call_applies(x: torch.Tensor, *modules: nn.Module | None) -> bool:
    """Whether a fused decode kernel may take ``x`` (b, d_model): float32 on CPU, and nothing for autograd to
    record (the kernels have no backward)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    return not (x.requires_grad and torch.is_grad_enabled()) and not records_autograd(*modules)


def records_autograd(*modules: nn.Module | None) -> bool:
    """Whether autograd would record a pass through ``modules`` (grad enabled and a parameter requiring it): the
    fused kernels have no backward, so they step aside."""
    return torch.is_grad_enabled() and any(p.requires_grad for m in modules if m is not None for p in m.parameters())


def call_fused_step(bind: Callable, fallback: Callable, x: torch.Tensor, mixer: nn.Module, state: object,
                    norm: RMSNorm | None) -> torch.Tensor:
    """A decode step of ``mixer`` on ``x`` (b, d_model): the fused call ``bind(mixer, state, norm)`` makes where
    it applies, else ``fallback(x, mixer, state, norm)`` (the torch step)."""
    step = bind(mixer, state, norm) if fused_call_applies(x, mixer, norm) else None
    if step is None:
        return fallback(x, mixer, state, norm)
    return torch.from_numpy(step(x.detach().contiguous().numpy()))

"""A block's residual step inside a mixer's fused decode kernel: the kernel normalises its input itself.

Given the block's pre-norm, a decode kernel computes ``hidden + mixer(norm(hidden))``, the block's whole update, in
one call. Between two kernels that have just streamed megabytes of weights, the separate RMSNorm call and the
residual add each met cold caches (~20-30 us a layer, ~0.6 ms a token of mamba-130m) for a few microseconds of
arithmetic inside the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

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


def block_arguments(x: torch.Tensor, norm: RMSNorm | None) -> tuple | None:
    """The kernels' leading arguments ``(hidden, residual, norm_w, norm_eps)`` for input ``x`` (b, d_model), or
    None when ``norm``'s weight is not a float32 CPU tensor (the caller then takes its torch path)."""
    if norm is None:
        return x.detach().contiguous().numpy(), False, EMPTY, 0.0
    w = numpy_views(norm)
    return None if w is None else (x.detach().contiguous().numpy(), True, w["weight"], norm.eps)

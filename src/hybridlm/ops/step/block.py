"""A block's pre-norm inside a decode-step kernel: the kernel normalises its input itself.

Given the block's RMSNorm weight, a step kernel computes ``hidden + mixer(norm(hidden))``, the block's whole update,
in one call. Between two kernels that have just streamed megabytes of weights, a separate RMSNorm call and the
residual add each met cold caches for a few microseconds of arithmetic inside the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from hybridlm.ops.norm.numba_ops import rms_norm_row

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

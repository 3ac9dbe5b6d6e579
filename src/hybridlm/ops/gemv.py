"""Matrix-vector products for decoding: a few rows of activations times a weight matrix, at memory bandwidth.

Decoding one token reads every weight once, so its speed is bytes / read bandwidth. On this machine (2
threads, fp32) ``torch.mv`` / ``F.linear`` with one row read weights at 10-18 GB/s, while a numba ``prange``
loop over output rows, each a vectorised dot product, reads them at ~30 GB/s, the machine's streaming rate.
``linear`` takes that path when it applies (CPU, float32, at most ``MAX_ROWS`` rows, no autograd) and is
``F.linear`` otherwise. ``linears`` multiplies one input by several matrices (attention's q, k, v; the MLP's
gate and up) in a single parallel loop: with sleeping OpenMP waiters every parallel region costs a wake-up of
the thread pool, measured here at tens to a hundred microseconds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

MAX_ROWS = 4  # above this many activation rows a BLAS matmul reuses each weight enough to win


@njit(cache=True, parallel=True, fastmath=True)
def gemv_into(Ws, x, biases, has_bias, ys):  # pragma: no cover - compiled
    # Ws: tuple of (o_m, i)  x: (b, i)  biases: tuple of (o_m,)  has_bias: (m,) bool
    # -> ys: tuple of (b, o_m) = x @ W_m.T (+ bias_m). One parallel loop over the rows of all the matrices:
    # each weight row is read once, and the thread pool is woken once for all of them.
    starts = np.zeros(len(Ws) + 1, dtype=np.int64)
    for m in range(len(Ws)):
        starts[m + 1] = starts[m] + Ws[m].shape[0]
    n_in = x.shape[1]
    for r in prange(starts[-1]):
        m = 0
        while r >= starts[m + 1]:
            m += 1
        W, y, row = Ws[m], ys[m], r - starts[m]
        for b in range(x.shape[0]):
            acc = W[row, 0] * x[b, 0]
            for k in range(1, n_in):
                acc += W[row, k] * x[b, k]
            y[b, row] = acc + biases[m][row] if has_bias[m] else acc


_NO_BIAS = np.zeros(1, dtype=np.float32)


def fast_gemv_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``linear`` / ``linears`` take the numba path for these arguments."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() <= MAX_ROWS * x.shape[-1]
            and x.shape[-1] > 0 and all(w.dtype == torch.float32 and w.is_contiguous() for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...]
            ) -> tuple[torch.Tensor, ...]:
    # x: (..., i)  weights[m]: (o_m, i)  biases[m]: (o_m,) or None -> ((..., o_m) for each m)
    if not fast_gemv_applies(x, *weights):
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
    rows = x.reshape(-1, x.shape[-1]).detach().contiguous()
    ys = tuple(torch.empty(rows.shape[0], w.shape[0], dtype=torch.float32) for w in weights)
    gemv_into(tuple(w.detach().numpy() for w in weights), rows.numpy(),
              tuple(_NO_BIAS if b is None else b.detach().float().contiguous().numpy() for b in biases),
              np.array([b is not None for b in biases]), tuple(y.numpy() for y in ys))
    return tuple(y.view(*x.shape[:-1], y.shape[1]) for y in ys)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: (..., i)  weight: (o, i)  bias: (o,) -> (..., o)
    return linears(x, (weight,), (bias,))[0]

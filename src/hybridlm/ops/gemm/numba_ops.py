"""Matrix-vector products for decoding: a few rows of activations times a weight matrix, at memory bandwidth.

Decoding one token reads every weight once, so its speed is bytes / read bandwidth. ``torch.mv`` / ``F.linear``
with one row read weights at about half the machine's streaming rate, which a numba ``prange`` loop over output
rows, each a vectorised dot product, reaches (docs/performance.md, "Figures behind the kernels").
``linear`` takes that path when it applies (CPU, float32, at most ``MAX_ROWS`` rows, no autograd) and is a
GEMM otherwise (oneDNN's where it applies, see ``onednn``; else ``F.linear``). ``linears`` multiplies one
input by several matrices (attention's q, k, v) in a single parallel loop: with sleeping OpenMP waiters
(``OMP_WAIT_POLICY=PASSIVE``) every parallel region costs a wake-up of the thread pool, tens of microseconds or
more. ``gated_mlp`` is a whole SwiGLU feed-forward in two such loops.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.fast_math import vexp
from hybridlm.ops.gemm import onednn
from hybridlm.ops.gemm.torch_ops import gated_mlp_torch, linears_torch

MAX_ROWS = 4  # above this many activation rows a BLAS matmul reuses each weight enough to win


@njit(cache=True, inline="always")
def row_dot(W, row, x, b):  # pragma: no cover - compiled
    # W: (o, i)  x: (b, i) -> W[row] . x[b]; vectorised when the caller allows reassociation (fastmath)
    acc = W[row, 0] * x[b, 0]
    for k in range(1, x.shape[1]):
        acc += W[row, k] * x[b, k]
    return acc


@njit(cache=True, inline="always")
def gemv_row(Ws, x, biases, has_bias, ys, r):  # pragma: no cover - compiled
    # Row r of the matrices Ws stacked (see gemv_into): ys[m][:, row] = x @ W_m[row] (+ bias_m[row]).
    # A helper for the prange loops of fused kernels (a parallel function called from another compiled
    # function breaks numba's on-disk cache: numba issue #8578).
    m, start = 0, 0
    while r >= start + Ws[m].shape[0]:
        start += Ws[m].shape[0]
        m += 1
    W, y, row = Ws[m], ys[m], r - start
    for b in range(x.shape[0]):
        acc = row_dot(W, row, x, b)
        y[b, row] = acc + biases[m][row] if has_bias[m] else acc


@njit(cache=True, parallel=True, fastmath=True)
def gemv_into(Ws, x, biases, has_bias, ys):  # pragma: no cover - compiled
    # Ws: tuple of (o_m, i)  x: (b, i)  biases: tuple of (o_m,)  has_bias: (m,) bool
    # -> ys: tuple of (b, o_m) = x @ W_m.T (+ bias_m). One parallel loop over the rows of all the matrices:
    # each weight row is read once, and the thread pool is woken once for all of them.
    total = 0
    for W in Ws:
        total += W.shape[0]
    for r in prange(total):
        gemv_row(Ws, x, biases, has_bias, ys, r)


@njit(cache=True, inline="always", fastmath={"contract", "arcp", "nsz", "reassoc"})
def swiglu_rows(x, W_gate, W_up, W_down, out):  # pragma: no cover - compiled
    # x: (b, d)  W_gate, W_up: (f, d)  W_down: (o, f) -> out: (b, o) = (silu(x W_gate^T) * x W_up^T) W_down^T; its
    # loops run in parallel in the parallel kernels that inline this
    hidden = np.empty((x.shape[0], W_gate.shape[0]), dtype=np.float32)
    for i in prange(W_gate.shape[0]):  # a gate row and an up row per step: the product needs both
        for b in range(x.shape[0]):
            gate, up = row_dot(W_gate, i, x, b), row_dot(W_up, i, x, b)
            hidden[b, i] = gate / (np.float32(1.0) + vexp(-gate)) * up
    for r in prange(W_down.shape[0]):
        for b in range(x.shape[0]):
            out[b, r] = row_dot(W_down, r, hidden, b)


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def _gated_mlp(x, W_gate, W_up, W_down, out):  # pragma: no cover - compiled
    # x: (b, d) -> out: (b, o), swiglu_rows in one call
    swiglu_rows(x, W_gate, W_up, W_down, out)


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
        return linears_torch(x, weights, biases, onednn.linear)
    rows = x.reshape(-1, x.shape[-1]).detach().contiguous()
    ys = tuple(torch.empty(rows.shape[0], w.shape[0], dtype=torch.float32) for w in weights)
    gemv_into(tuple(w.detach().numpy() for w in weights), rows.numpy(),
              tuple(_NO_BIAS if b is None else b.detach().float().contiguous().numpy() for b in biases),
              np.array([b is not None for b in biases]), tuple(y.numpy() for y in ys))
    return tuple(y.view(*x.shape[:-1], y.shape[1]) for y in ys)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: (..., i)  weight: (o, i)  bias: (o,) -> (..., o)
    return linears(x, (weight,), (bias,))[0]


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    # x: (..., d)  w_gate, w_up: (f, d)  w_down: (o, f) -> (..., o)
    if not fast_gemv_applies(x, w_gate, w_up, w_down):
        return gated_mlp_torch(x, w_gate, w_up, w_down, onednn.linear)
    rows = x.reshape(-1, x.shape[-1]).detach().contiguous()
    out = torch.empty(rows.shape[0], w_down.shape[0], dtype=torch.float32)
    _gated_mlp(rows.numpy(), w_gate.detach().numpy(), w_up.detach().numpy(), w_down.detach().numpy(), out.numpy())
    return out.view(*x.shape[:-1], out.shape[1])

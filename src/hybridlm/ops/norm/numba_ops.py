"""RMSNorm of a few rows (decoding) in one compiled call.

A decode step can run a norm per block between the compiled mixer kernels, and each finds the CPU's caches cold:
``F.rms_norm`` of one row is several torch ops through the dispatcher (pow, mean, add, rsqrt, mul, casts), each slow
there, where one compiled call is a few microseconds (docs/performance.md, "Figures behind the kernels"). The
kernel's row helper is also the Mamba steps' (Jamba's inner norms, Mamba-2's grouped output norm).

Mamba-2's gated RMSNorm, ``weight * rmsnorm(y * silu(z))`` with statistics per group of channels, is one pass over
the rows for CPU float32 inference: the torch form makes six passes over (tokens, d_inner) tensors, silu reading z
through its strided view of in_proj's output.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.fast_math import vexp
from hybridlm.ops.norm.torch_ops import gated_rms_norm_torch, rms_norm_torch

MAX_ROWS = 64  # decode batches; longer inputs take torch's vectorised, multi-threaded op


@njit(cache=True, inline="always")
def rms_norm_row(v, w, eps, out):  # pragma: no cover - compiled
    # v: (d,) -> out: (d,) = w * v / sqrt(mean(v^2) + eps), statistics in float64; out may be v itself
    ss = 0.0
    for i in range(v.size):
        ss += np.float64(v[i]) * v[i]
    scale = 1.0 / np.sqrt(ss / v.size + eps)
    for i in range(v.size):
        out[i] = w[i] * np.float32(v[i] * scale)


@njit(cache=True)
def _rms_norm_rows(x, w, eps, out):  # pragma: no cover - compiled
    # x: (rows, d)  w: (d,) -> out: (rows, d)
    for r in range(x.shape[0]):
        rms_norm_row(x[r], w, eps, out[r])


def rms_norm_numba(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., d)  weight: (d,) -> (..., d); the torch op outside float32 CPU inference on at most MAX_ROWS rows.
    # Lean on purpose: between two decode kernels every torch call here meets cold caches (~3 us each).
    d = x.shape[-1]
    if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or not x.is_cpu or not weight.is_cpu
            or not 0 < x.numel() <= MAX_ROWS * d or x.requires_grad
            or (weight.requires_grad and torch.is_grad_enabled())):
        return rms_norm_torch(x, weight, eps)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _rms_norm_rows(x.numpy().reshape(-1, d), weight.detach().numpy(), eps, out.numpy().reshape(-1, d))
    return out


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def _gated_rms_norm(y, z, weight, n_groups, eps, out):  # pragma: no cover - compiled
    # y, z: (rows, d), z possibly strided  weight: (d,) -> out: (rows, d). Each row's z is first copied into its
    # output row: the loops after it then run over contiguous 1-d rows, which vectorise (over z's strided view
    # directly, the same loops took 5x longer).
    group = y.shape[1] // n_groups
    one = np.float32(1.0)
    for r in prange(y.shape[0]):
        y_row, row = y[r], out[r]
        for j in range(row.size):
            row[j] = z[r, j]
        for j in range(row.size):
            row[j] = y_row[j] * row[j] / (one + vexp(-row[j]))
        for g in range(n_groups):
            part, w = row[g * group:(g + 1) * group], weight[g * group:(g + 1) * group]
            ss = np.float32(0.0)
            for j in range(group):
                ss += part[j] * part[j]
            scale = np.float32(1.0 / np.sqrt(ss / group + eps))
            for j in range(group):
                part[j] = w[j] * (part[j] * scale)


def gated_rms_norm_numba(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
                         ) -> torch.Tensor:
    # y, z: (..., d) -> (..., d); the torch form outside float32 CPU inference
    d = y.shape[-1]
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (y, z, weight))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (y, z, weight)))
            or z.shape != y.shape or y.numel() == 0 or d % n_groups):
        return gated_rms_norm_torch(y, z, weight, n_groups, eps)
    rows_z = z.reshape(-1, d)  # a view where the strides allow (z is in_proj's output sliced on its last dim)
    out = torch.empty(y.shape, dtype=torch.float32)
    _gated_rms_norm(y.detach().reshape(-1, d).numpy(), rows_z.detach().numpy(), weight.detach().numpy(), n_groups,
                    eps, out.view(-1, d).numpy())
    return out

"""RMSNorm of a few rows (decoding) in one compiled call.

A decode step runs ~25 norms a token (mamba-130m) between the compiled mixer kernels, and each finds the CPU's
caches cold: ``F.rms_norm`` of one 768-wide row took ~19 us in a hot loop but ~45 us there (pow, mean, add,
rsqrt, mul and casts through torch's dispatcher), ~1.1 ms a token; this call takes ~12 us there. The kernel's
row helper is also the Mamba steps' (Jamba's inner norms, Mamba-2's grouped output norm)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from hybridlm.ops.rms_norm import rms_norm_torch

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

"""RMSNorm and Mamba-2's gated RMSNorm in plain torch: the ops' torch backends (any device and dtype, autograd),
and what the numba forms fall back to."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., d)  weight: (d,) -> (..., d). Statistics in float32 whatever the input dtype, as the reference
    # models do; the weight multiplies after the cast back (Hugging Face Llama/Mamba).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def gated_rms_norm_torch(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float
                         ) -> torch.Tensor:
    # y, z: (..., d)  weight: (d,) -> (..., d); the gate before the norm (mamba_ssm's norm_before_gate=False)
    dtype = y.dtype
    g = y.float() * F.silu(z.float())
    g = g.unflatten(-1, (n_groups, -1))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.flatten(-2).to(dtype)

"""RMSNorm in plain torch: the ``rms_norm`` op's torch backend, and what the numba one falls back to."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., d)  weight: (d,) -> (..., d). Statistics in float32 whatever the input dtype, as the reference
    # models do; the weight multiplies after the cast back (Hugging Face Llama/Mamba).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

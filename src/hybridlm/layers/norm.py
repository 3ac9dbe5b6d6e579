"""RMSNorm and the gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019) with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``rmsnorm(y * silu(z))`` with statistics per group of channels.

    The gate is applied before normalising (mamba_ssm's ``norm_before_gate=False``); with ``n_groups > 1``
    each group of ``dim / n_groups`` channels is normalised on its own.
    """

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y, z: (..., dim) -> (..., dim)
        return ops.gated_rms_norm(y, z, self.weight, self.n_groups, self.eps)

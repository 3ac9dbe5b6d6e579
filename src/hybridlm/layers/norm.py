"""RMSNorm and the gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops
from hybridlm.layers.numpy_views import numpy_views
from hybridlm.ops.step.block import EMPTY


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019) with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def block_arguments(norm: RMSNorm | None) -> tuple | None:
    """A step kernel's ``(residual, norm_w, norm_eps)`` for a block's pre-norm ``norm`` (None: the mixer alone, no
    residual), or None when its weight is not a float32 CPU tensor."""
    if norm is None:
        return False, EMPTY, 0.0
    w = numpy_views(norm)
    return None if w is None else (True, w["weight"], norm.eps)


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

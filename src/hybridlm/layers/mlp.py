"""Gated feed-forward (SwiGLU; Shazeer 2020), as in Llama."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hybridlm import ops
from hybridlm.layers.linear import Linear

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


class GatedMLP(nn.Module):
    kind = "mlp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (b, l, d_model) -> (b, l, d_model), no auxiliary loss
        return ops.gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight), None

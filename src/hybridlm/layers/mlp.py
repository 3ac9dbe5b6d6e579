"""Gated feed-forward (SwiGLU; Shazeer 2020), as in Llama."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.layers.linear import Linear, is_plain
from hybridlm.layers.norm import RMSNorm, block_arguments
from hybridlm.layers.numpy_views import numpy_views

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
        if not is_plain(self.gate_proj, self.up_proj, self.down_proj):  # wrapped (LoRA): their forwards must run
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None
        return ops.gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight), None

    def bind_step(self, norm: RMSNorm) -> Callable[[np.ndarray], tuple[np.ndarray, float]] | None:
        """The block's feed-forward half of a decode step as a call on float32 arrays: hidden (b, d_model) ->
        (hidden + self(norm(hidden)), 0.0), with the weights and the block's ``norm`` bound; None where the dispatch
        picks the modules or the weights are not float32 CPU tensors."""
        kernel, block, w = ops.step_kernel("mlp_step"), block_arguments(norm), numpy_views(self)
        if kernel is None or block is None or w is None:
            return None
        _, norm_w, norm_eps = block
        return partial(kernel, norm_w, norm_eps, w["gate_proj.weight"], w["up_proj.weight"],
                       w["down_proj.weight"])

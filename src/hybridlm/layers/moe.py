"""Sparse Mixture-of-Experts feed-forward: a top-k router over SwiGLU experts (Mixtral, Jamba, DBRX).

Each token goes to its ``top_k`` experts; the experts' outputs are mixed with the router's softmax weights
(renormalised over the chosen experts as in Mixtral, or not, as in Jamba). Tokens are gathered per expert,
so each expert runs one dense matmul over exactly the tokens routed to it; nothing is dropped.

Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4; Mixtral's form with top-k routing):

    aux = n_experts * sum_e f_e * P_e

where ``f_e`` is the fraction of the ``tokens * top_k`` routing slots that went to expert ``e`` and ``P_e``
the mean router probability of ``e``. Both sum to 1 over experts, so a uniform router gives exactly 1.0
per MoE layer; the model sums it over MoE layers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.layers.norm import RMSNorm, block_arguments
from hybridlm.layers.numpy_views import numpy_views

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


class MoE(nn.Module):
    kind = "moe"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.normalize_topk = config.n_experts, config.top_k, config.moe_normalize_topk
        e, d, f = config.n_experts, config.d_model, config.d_ff
        self.router = nn.Linear(d, e, bias=False)
        # Experts' SwiGLU weights stacked along a leading expert axis, in nn.Linear's (out, in) layout.
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters of which only top_k / n_experts are used per token."""
        return [self.gate_proj, self.up_proj, self.down_proj]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (b, l, d_model), mask: (b, l) bool or None -> y: (b, l, d_model), aux_loss: scalar float32
        tokens = x.reshape(-1, x.shape[-1])  # (t, d)
        probs = F.softmax(self.router(tokens).float(), dim=-1)  # (t, e)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (t, k)
        if self.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype).flatten()

        # Sort the t*k routing slots by expert so each expert's tokens are one contiguous slice.
        slots = experts.flatten()
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.n_experts)
        out = torch.zeros_like(tokens)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            chosen = order[start : start + n]
            start += n
            rows = chosen // self.top_k
            # A few tokens (decoding): the matrix-vector kernel reads the expert at memory bandwidth.
            y = ops.gated_mlp(tokens[rows], self.gate_proj[e], self.up_proj[e], self.down_proj[e])
            out.index_add_(0, rows, y * weights[chosen, None])
        return out.view_as(x), self._balance_loss(probs, experts, mask)

    def _balance_loss(self, probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # probs: (t, e), experts: (t, k); padding tokens (mask False) are left out of both averages.
        one_hot = F.one_hot(experts, self.n_experts).float().sum(1)  # (t, e): slots given to each expert
        if mask is not None:
            keep = mask.reshape(-1, 1).float()
            n = keep.sum().clamp(min=1)
            fraction = (one_hot * keep).sum(0) / (n * self.top_k)
            mean_prob = (probs * keep).sum(0) / n
        else:
            fraction = one_hot.mean(0) / self.top_k
            mean_prob = probs.mean(0)
        return self.n_experts * (fraction * mean_prob).sum()

    def bind_step(self, norm: RMSNorm) -> Callable[[np.ndarray], tuple[np.ndarray, float]] | None:
        """The block's feed-forward half of a decode step as a call on float32 arrays: hidden (b, d_model) ->
        (hidden + self(norm(hidden)), the load-balancing loss of the step), the router's softmax and top-k, the
        chosen experts and the residual in one kernel, with the weights and the block's ``norm`` bound; None where
        the dispatch picks the modules or the weights are not float32 CPU tensors."""
        kernel, block, w = ops.step_kernel("moe_step"), block_arguments(norm), numpy_views(self)
        if kernel is None or block is None or w is None or "router.bias" in w:
            return None
        _, norm_w, norm_eps = block
        return partial(kernel, norm_w, norm_eps, w["router.weight"], w["gate_proj"], w["up_proj"],
                       w["down_proj"], self.top_k, self.normalize_topk)

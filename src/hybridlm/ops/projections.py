"""Dense projections in plain torch: one input through several matrices, and the SwiGLU feed-forward.

The torch backends of the ``linears`` and ``gated_mlp`` ops, and what the matrix-vector kernels in ``gemv``
fall back to outside their domain (many rows, autograd, other dtypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linears_torch(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...]
                  ) -> tuple[torch.Tensor, ...]:
    # x: (..., i)  weights[m]: (o_m, i)  biases[m]: (o_m,) or None -> ((..., o_m) for each m)
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))


def gated_mlp_torch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    # x: (..., d)  w_gate, w_up: (f, d)  w_down: (o, f) -> (..., o)
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

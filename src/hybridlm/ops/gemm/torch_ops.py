"""Dense projections in plain torch: one input through several matrices, and the SwiGLU feed-forward.

The torch backends of the ``linears`` and ``gated_mlp`` ops, and what the matrix-vector kernels in ``gemm/numba_ops``
fall back to outside their domain (many rows, autograd, other dtypes), there with oneDNN's GEMM as ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # F.linear's contract


def linears_torch(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...],
                  linear: Linear = F.linear) -> tuple[torch.Tensor, ...]:
    # x: (..., i)  weights[m]: (o_m, i)  biases[m]: (o_m,) or None -> ((..., o_m) for each m)
    return tuple(linear(x, w, b) for w, b in zip(weights, biases, strict=True))


def gated_mlp_torch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    linear: Linear = F.linear) -> torch.Tensor:
    # x: (..., d)  w_gate, w_up: (f, d)  w_down: (o, f) -> (..., o)
    return linear(F.silu(linear(x, w_gate, None)) * linear(x, w_up, None), w_down, None)

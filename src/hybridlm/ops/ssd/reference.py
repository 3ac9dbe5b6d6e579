"""Mamba-2 SSD, written as its sequential recurrence (the oracle for the chunked form).

Per head h (scalar decay A_h), with B and C shared by the heads of one group:
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T      (S is (headdim, d_state))
    y_t = S_t C_t + D_h * x_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """The effective step size: softplus(dt + dt_bias) when asked, in the compute dtype."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 256,  # unused: the recurrence needs no chunks; kept so every backend shares a signature
) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (b, l, h, p)  dt: (b, l, h)  A, D, dt_bias: (h,)  B, C: (b, l, g, n)  initial_state: (b, h, p, n)
    # -> y: (b, l, h, p) in x's dtype, final_state: (b, h, p, n) in float32 (float64 for float64 inputs)
    compute = torch.promote_types(x.dtype, torch.float32)
    dt = prepare_dt(dt, dt_bias, dt_softplus, compute)
    batch, length, n_heads, headdim = x.shape
    heads_per_group = n_heads // B.shape[2]
    B_h = B.to(compute).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C_h = C.to(compute).repeat_interleave(heads_per_group, dim=2)
    x_c, A_c = x.to(compute), A.to(compute)
    S = (torch.zeros(batch, n_heads, headdim, B.shape[3], dtype=compute, device=x.device)
         if initial_state is None else initial_state.to(compute))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A_c)[:, :, None, None]  # (b, h, 1, 1)
        S = decay * S + (dt[:, t, :, None] * x_c[:, t])[..., None] * B_h[:, t, :, None, :]
        ys.append((S * C_h[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x_c.new_zeros(x.shape)
    if D is not None:
        y = y + x_c * D.to(compute)[:, None]
    return y.to(x.dtype), S

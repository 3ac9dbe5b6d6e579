"""Mamba-1 selective scan, written directly from the recurrence: the oracle every fast kernel is tested against.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (per channel d: h is (d_state,))
    y_t = C_t . h_t + D * x_t,      then  y_t * silu(z_t)   when a gate z is given

A sequential loop over time: slow, obviously correct, and it never materialises a
(batch, length, d_inner, d_state) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, dt, z: (b, l, d)   A: (d, n)   B, C: (b, l, n)   D, dt_bias: (d,)   initial_state: (b, d, n)
    # -> y: (b, l, d) in x's dtype, final_state: (b, d, n) in float32 (float64 for float64 inputs)
    compute = torch.promote_types(x.dtype, torch.float32)
    dt = dt.to(compute)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    x_c, A_c, B_c, C_c = x.to(compute), A.to(compute), B.to(compute), C.to(compute)
    batch, length, d_inner = x.shape
    h = (torch.zeros(batch, d_inner, A.shape[1], dtype=compute, device=x.device)
         if initial_state is None else initial_state.to(compute))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t, :, None] * A_c)  # (b, d, n)
        h = decay * h + (dt[:, t] * x_c[:, t])[:, :, None] * B_c[:, t, None, :]
        ys.append((h * C_c[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x_c.new_zeros(batch, 0, d_inner)
    if D is not None:
        y = y + x_c * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(x.dtype), h

"""Mamba-2 SSD in its chunked, matmul-shaped form (Dao & Gu 2024, arXiv 2405.21060, section 6).

The sequence is cut into chunks of Q steps. Inside a chunk the output is a masked, decayed attention-like
product (batched matmuls); across chunks only a (headdim, d_state) state per head is carried, in a loop
that is linear in the number of chunks. Work is O(L * Q) instead of the recurrence's O(L) sequential steps,
but it is all BLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.ssd.reference import prepare_dt

# The chunk size changes the cost, never the result. On CPU the (q, q) intra-chunk tensors are memory traffic
# of h * q floats per token, while the state passing costs the same for any q: chunks of 64 measured 1.5-5x
# faster here than 256 (mamba2-130m shapes, L 1024, 2 threads), so CPU uses at most this many steps a chunk.
CPU_MAX_CHUNK = 64


def segment_decay(a_cum: torch.Tensor) -> torch.Tensor:
    # a_cum: (..., Q) within-chunk cumulative log-decays -> (..., Q, Q) with [i, j] = exp(a_{j+1} + ... + a_i)
    # for j <= i, 0 above. As the official kernels do, from differences of the cumulative sums: within a chunk
    # they are exact to float32 rounding of a_cum (relative ~1e-7 of its magnitude), and three passes over the
    # (Q, Q) tensors replace the five of summing masked increments.
    q = a_cum.shape[-1]
    above = torch.ones(q, q, dtype=torch.bool, device=a_cum.device).triu(1)
    return (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(above, float("-inf")).exp_()


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (b, l, h, p)  dt: (b, l, h)  A, D, dt_bias: (h,)  B, C: (b, l, g, n)  initial_state: (b, h, p, n)
    # -> y: (b, l, h, p) in x's dtype, final_state: (b, h, p, n) in float32 (float64 for float64 inputs)
    compute = torch.promote_types(x.dtype, torch.float32)
    batch, length, n_heads, headdim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    r = n_heads // n_groups  # heads per group
    if x.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_MAX_CHUNK)
    q = max(1, min(chunk_size, length))
    n_chunks = -(-length // q)
    pad = n_chunks * q - length

    dt = prepare_dt(dt, dt_bias, dt_softplus, compute)
    x_c, B_c, C_c = x.to(compute), B.to(compute), C.to(compute)
    if pad:
        # Zero steps at the end: dt = 0 means no decay and no input, so the final state is unchanged.
        x_c = F.pad(x_c, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B_c = F.pad(B_c, (0, 0, 0, 0, 0, pad))
        C_c = F.pad(C_c, (0, 0, 0, 0, 0, pad))
    x_c = x_c.view(batch, n_chunks, q, n_heads, headdim)
    dt = dt.view(batch, n_chunks, q, n_heads)
    B_c = B_c.view(batch, n_chunks, q, n_groups, d_state)
    C_c = C_c.view(batch, n_chunks, q, n_groups, d_state)

    a = (dt * A.to(compute)).transpose(2, 3)  # (b, c, h, q) log-decay of each step
    a_cum = a.cumsum(-1)
    x_dt = x_c * dt[..., None]  # (b, c, q, h, p)

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1..i}) dt_j x_j
    CB = torch.einsum("bcign,bcjgn->bcgij", C_c, B_c)  # (b, c, g, q, q)
    decay = segment_decay(a_cum).view(batch, n_chunks, n_groups, r, q, q)
    scores = (decay * CB[:, :, :, None]).view(batch, n_chunks, n_heads, q, q)
    y = scores @ x_dt.permute(0, 1, 3, 2, 4)  # (b, c, h, q, p)

    # 2. The state each chunk leaves behind, starting from zero: sum_j exp(a_{j+1..end}) dt_j x_j B_j^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, c, h, q)
    weighted = (x_dt * to_end.transpose(2, 3)[..., None]).view(batch, n_chunks, q, n_groups, r, headdim)
    chunk_states = torch.einsum("bcjgrp,bcjgn->bcgrpn", weighted, B_c)
    chunk_states = chunk_states.reshape(batch, n_chunks, n_heads, headdim, d_state)

    # 3. Carry the state across chunks (sequential in the number of chunks only).
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, c, h)
    state = (x_c.new_zeros(batch, n_heads, headdim, d_state) if initial_state is None
             else initial_state.to(compute))
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1).view(batch, n_chunks, n_groups, r, headdim, d_state)

    # 4. Contribution of the state entering each chunk: y_i += exp(a_{1..i}) C_i . S_in
    y_off = torch.einsum("bcign,bcgrpn->bcgrip", C_c, states_in).reshape(batch, n_chunks, n_heads, q, headdim)
    y = y.addcmul_(y_off, torch.exp(a_cum)[..., None])  # in place: y is no input of any backward

    y = y.permute(0, 1, 3, 2, 4).reshape(batch, n_chunks * q, n_heads, headdim)[:, :length]
    if D is not None:
        y = torch.addcmul(y, x.to(compute), D.to(compute)[:, None])
    return y.to(x.dtype), state

"""Mamba-2 SSD for CPU inference: the chunked form with its matmuls in BLAS and the rest in one numba pass.

The chunked form (``ssd_chunked``) has three matmul-shaped parts: the state each chunk leaves behind, the
contribution of the state entering a chunk, and the intra-chunk product ``(C B^T * decay) @ (dt x)``. The
first two are large GEMMs once the heads of a group share one matrix (``(heads x headdim, chunk) @ (chunk,
d_state)``); they stay in BLAS, on views of the activations' natural (b, l, h, p) layout, so nothing is
permuted. The third is h small (chunk, chunk) products per chunk, each behind four elementwise passes over
(h, chunk, chunk) tensors (differences, mask, exp, product) in torch; here one numba task per (chunk, head)
builds each decay row in L1 (a vectorised exp over the row), accumulates it against dt x, and adds the
entering state's contribution and the D skip on the way, writing y once: about half ``ssd_chunked``'s time at
mamba2-130m's shapes (docs/performance.md, "Figures behind the kernels").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from hybridlm.ops.fast_math import vexp
from hybridlm.ops.ssd.chunked import CPU_MAX_CHUNK, ssd_chunked
from hybridlm.ops.ssd.reference import prepare_dt


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz"})
def _chunk_outputs(x, dt, a_cum, CB, y_off, D, y):  # pragma: no cover - compiled
    # x, y: (b, c * q, h, p)  dt: (b, c * q, h)  a_cum: (b, c, h, q)  CB: (b, c, g, q, q) (only i >= j read)
    # y_off: (b, c, g, q, r * p), C_i . S_in per head of group g  D: (h,)
    # y_i = sum_{j <= i} CB_ij exp(a_cum_i - a_cum_j) dt_j x_j + exp(a_cum_i) y_off_i + D x_i
    # Inner loops index 1-D row views by their loop variable: LLVM vectorises those, while loops indexing the
    # 4-D arrays directly stayed scalar (about half the speed).
    batch, _, n_heads, headdim = x.shape
    n_chunks, q = a_cum.shape[1], a_cum.shape[3]
    r = n_heads // CB.shape[2]
    for task in prange(batch * n_chunks * n_heads):
        b = task // (n_chunks * n_heads)
        c = (task // n_heads) % n_chunks
        h = task % n_heads
        g, k0 = h // r, (h % r) * headdim
        t0 = c * q
        a = a_cum[b, c, h]
        cb = CB[b, c, g]
        d = D[h]
        xs = np.empty((q, headdim), dtype=np.float32)  # the chunk's inputs of this head, contiguous (L1)
        dts = np.empty(q, dtype=np.float32)
        for j in range(q):
            dts[j] = dt[b, t0 + j, h]
            src, dst = x[b, t0 + j, h], xs[j]
            for k in range(headdim):
                dst[k] = src[k]
        weight = np.empty(q, dtype=np.float32)
        acc = np.empty(headdim, dtype=np.float32)
        for i in range(q):
            a_i, cb_i = a[i], cb[i]
            for j in range(i + 1):
                weight[j] = cb_i[j] * vexp(a_i - a[j]) * dts[j]
            decay_in = vexp(a_i)
            off, x_i = y_off[b, c, g, i, k0:k0 + headdim], xs[i]
            for k in range(headdim):
                acc[k] = decay_in * off[k] + d * x_i[k]
            j = 0
            while j + 4 <= i + 1:  # four steps per pass over acc: a quarter of its loads and stores
                w0, w1, w2, w3 = weight[j], weight[j + 1], weight[j + 2], weight[j + 3]
                x0, x1, x2, x3 = xs[j], xs[j + 1], xs[j + 2], xs[j + 3]
                for k in range(headdim):
                    acc[k] = acc[k] + w0 * x0[k] + w1 * x1[k] + w2 * x2[k] + w3 * x3[k]
                j += 4
            for tail in range(j, i + 1):
                w, x_j = weight[tail], xs[tail]
                for k in range(headdim):
                    acc[k] += w * x_j[k]
            out = y[b, t0 + i, h]
            for k in range(headdim):
                out[k] = acc[k]


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz"})
def _pass_states(chunk_states, chunk_decay, state):  # pragma: no cover - compiled
    # chunk_states: (b, c, h, p * n), the state each chunk leaves starting from zero, overwritten in place with
    # the state *entering* each chunk.  chunk_decay: (b, c, h)  state: (b, h, p * n), in: initial, out: final.
    batch, n_chunks, n_heads, size = chunk_states.shape
    for task in prange(batch * n_heads):
        b, h = task // n_heads, task % n_heads
        s = state[b, h]
        for c in range(n_chunks):
            decay = chunk_decay[b, c, h]
            leaving = chunk_states[b, c, h]
            for k in range(size):
                entering = s[k]
                s[k] = entering * decay + leaving[k]
                leaving[k] = entering


def ssd_numba(
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
    # -> y: (b, l, h, p) in x's dtype, final_state: (b, h, p, n) in float32
    # Inference only (CPU, float32 activations, no autograd); otherwise the torch chunked form.
    tensors = (x, dt, A, B, C, D, dt_bias, initial_state)
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] == 0
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))):
        return ssd_chunked(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, chunk_size)
    batch, length, n_heads, headdim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    r = n_heads // n_groups
    q = max(1, min(chunk_size, CPU_MAX_CHUNK, length))
    n_chunks = -(-length // q)
    pad = n_chunks * q - length
    f32 = torch.float32

    dt = prepare_dt(dt.detach(), None if dt_bias is None else dt_bias.detach(), dt_softplus, f32)
    x, B, C = x.detach(), B.detach().to(f32), C.detach().to(f32)
    if pad:  # zero steps at the end: dt = 0 neither decays nor feeds the state
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    x, dt = x.contiguous(), dt.contiguous()
    B_c = B.view(batch, n_chunks, q, n_groups, d_state).transpose(2, 3)  # (b, c, g, q, n)
    C_c = C.view(batch, n_chunks, q, n_groups, d_state).transpose(2, 3)

    a_cum = (dt * A.detach().to(f32)).view(batch, n_chunks, q, n_heads).transpose(2, 3).cumsum(-1)  # (b, c, h, q)
    a_cum = a_cum.contiguous()
    # The state each chunk leaves from zero: (dt_j exp(a_end - a_j) x_j)^T B_j summed over the chunk, one GEMM
    # per (chunk, group) with the group's heads side by side: (r * p, q) @ (q, n).
    to_end = (torch.exp(a_cum[..., -1:] - a_cum) * dt.view(batch, n_chunks, q, n_heads).transpose(2, 3))
    weighted = x.view(batch, n_chunks, q, n_heads, headdim) * to_end.transpose(2, 3)[..., None]
    weighted = weighted.view(batch, n_chunks, q, n_groups, r * headdim).permute(0, 1, 3, 4, 2)  # (b, c, g, rp, q)
    chunk_states = torch.matmul(weighted, B_c)  # (b, c, g, r * p, n) == (b, c, h, p, n)

    state = (torch.zeros(batch, n_heads, headdim, d_state) if initial_state is None
             else initial_state.detach().to(f32).clone(memory_format=torch.contiguous_format))
    chunk_decay = torch.exp(a_cum[..., -1]).contiguous()  # (b, c, h)
    _pass_states(chunk_states.view(batch, n_chunks, n_heads, headdim * d_state).numpy(), chunk_decay.numpy(),
                 state.view(batch, n_heads, headdim * d_state).numpy())
    # chunk_states now holds the state entering each chunk; its contribution C_i . S_in, per group one GEMM.
    y_off = torch.matmul(C_c, chunk_states.transpose(-1, -2))  # (b, c, g, q, r * p)
    CB = torch.matmul(C_c, B_c.transpose(-1, -2))  # (b, c, g, q, q)

    y = torch.empty_like(x)
    d = torch.zeros(n_heads) if D is None else D.detach().to(f32).contiguous()
    _chunk_outputs(x.numpy(), dt.numpy(), a_cum.numpy(), CB.contiguous().numpy(), y_off.contiguous().numpy(),
                   d.numpy(), y.numpy())
    return y[:, :length], state

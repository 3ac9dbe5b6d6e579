"""The Mamba-1 and Mamba-2 decode steps, each in one compiled call (CPU, float32 inference).

in_proj, conv, x_proj, dt_proj + softplus, the scan step, the gate and out_proj, each projection a ``prange`` loop
over output rows that reads the weights once (``row_dot`` of ``gemm/numba_ops``): no tensor shaped by the context, one
Python-to-numba crossing per layer, or per token for a model of such blocks alone (``mamba_stack``). Every stage runs in
parallel, the conv inside in_proj's loop (a channel's conv needs only its own in_proj row): with OpenMP's default
spin-then-sleep waiters a parallel region inside the kernel costs about a microsecond, less than the conv, x_proj or
the state update take on one thread. Mamba-1 reads in_proj's z rows in the state update's loop rather than with the
x rows: the update's exps then run while those rows stream in (Mamba-2's cheaper update gained nothing from the same
move). The A/Bs: docs/performance.md, "Figures behind the kernels".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from hybridlm.ops.fast_math import vexp
from hybridlm.ops.gemm.numba_ops import row_dot
from hybridlm.ops.norm.numba_ops import rms_norm_row
from hybridlm.ops.step.block import block_input
from hybridlm.ops.step.head import embedding_rows, norm_linear_rows


class MambaLayer(NamedTuple):
    """A Mamba-1 block's decode-step arguments (float32 arrays unless noted; ``EMPTY`` where absent)."""

    block_norm_w: np.ndarray  # (d_model,), the block's pre-norm (read with a residual step)
    block_norm_eps: float
    conv_state: np.ndarray  # (b, d_inner, k), updated in place
    ssm: np.ndarray  # (b, d_inner, n), updated in place
    W_in: np.ndarray  # (2 d_inner, d_model)
    b_in: np.ndarray
    conv_w: np.ndarray  # (d_inner, k)
    conv_b: np.ndarray
    W_x: np.ndarray  # (dt_rank + 2 n, d_inner)
    W_dt: np.ndarray  # (d_inner, dt_rank)
    dt_bias: np.ndarray  # (d_inner,)
    A_log: np.ndarray  # (d_inner, n)
    D: np.ndarray  # (d_inner,)
    W_out: np.ndarray  # (d_model, d_inner)
    b_out: np.ndarray
    norm_dt: np.ndarray  # Jamba's inner RMSNorms on dt, B and C
    norm_B: np.ndarray
    norm_C: np.ndarray
    eps: np.float32  # their eps
    flags: np.ndarray  # bool: [in bias, conv bias, out bias, inner norms]


class Mamba2Layer(NamedTuple):
    """A Mamba-2 block's decode-step arguments (float32 arrays unless noted; ``EMPTY`` where absent)."""

    block_norm_w: np.ndarray  # (d_model,)
    block_norm_eps: float
    conv_state: np.ndarray  # (b, conv_dim, k), updated in place
    ssm: np.ndarray  # (b, h, p, n), updated in place
    W_in: np.ndarray  # (d_inner + conv_dim + h, d_model): rows [z | x B C | dt]
    b_in: np.ndarray
    conv_w: np.ndarray  # (conv_dim, k)
    conv_b: np.ndarray
    dt_bias: np.ndarray  # (h,)
    A_log: np.ndarray  # (h,)
    D: np.ndarray  # (h,)
    norm_w: np.ndarray  # (d_inner,), the gated output norm
    eps: np.float32
    W_out: np.ndarray  # (d_model, d_inner)
    b_out: np.ndarray
    flags: np.ndarray  # bool: [in bias, conv bias, out bias]


_FASTMATH = {"contract", "arcp", "nsz", "reassoc"}


@njit(cache=True, inline="always")
def _conv_silu_step(conv_state, conv_w, conv_b, has_bias, b, c, value):  # pragma: no cover - compiled
    # conv_state: (b, channels, k)  conv_w: (channels, k) -> SiLU of channel c's causal conv once ``value`` has
    # entered sequence b's window (shifted left by one, in place)
    k = conv_w.shape[1]
    for j in range(k - 1):
        conv_state[b, c, j] = conv_state[b, c, j + 1]
    conv_state[b, c, k - 1] = value
    acc = conv_b[c] if has_bias else np.float32(0.0)
    for j in range(k):
        acc += conv_w[c, j] * conv_state[b, c, j]
    return acc / (np.float32(1.0) + vexp(-acc))


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _mamba_layer(residual, layer, hidden):  # pragma: no cover - compiled
    # The step's body, inlined into the parallel kernels below (its prange loops run in parallel there).
    # hidden: (b, d_model), the mixer's input, or with ``residual`` the block's: out = hidden + mixer(norm(hidden))
    # layer: a MambaLayer
    (block_norm_w, block_norm_eps, conv_state, ssm, W_in, b_in, conv_w, conv_b, W_x, W_dt, dt_bias, A_log, D, W_out,
     b_out, norm_dt, norm_B, norm_C, eps, flags) = layer
    # W_in: (2 d_inner, d_model)  conv_w: (d_inner, k)  conv_state: (b, d_inner, k)  W_x: (dt_rank + 2 n, d_inner)
    # W_dt: (d_inner, dt_rank)  A_log: (d_inner, n)  ssm: (b, d_inner, n)  W_out: (d_model, d_inner)
    # -> out: (b, d_model).  flags: [in bias, conv bias, out bias, inner norms]
    x = block_input(hidden, residual, block_norm_w, block_norm_eps)
    out = np.empty_like(hidden)
    batch = x.shape[0]
    d_inner = conv_w.shape[0]
    n_state = A_log.shape[1]
    dt_rank = W_dt.shape[1]
    n_xp = W_x.shape[0]
    one = np.float32(1.0)
    xc = np.empty((batch, d_inner), dtype=np.float32)
    for r in prange(d_inner):  # in_proj's x rows: one read of each weight row; then channel r's causal conv, SiLU
        for b in range(batch):
            acc = row_dot(W_in, r, x, b)
            xc[b, r] = _conv_silu_step(conv_state, conv_w, conv_b, flags[1], b, r, acc + b_in[r] if flags[0] else acc)
    dbc = np.empty((batch, n_xp), dtype=np.float32)
    for r in prange(n_xp):  # x_proj -> [dt (dt_rank), B (n), C (n)]
        for b in range(batch):
            dbc[b, r] = row_dot(W_x, r, xc, b)
    if flags[3]:  # Jamba's RMSNorms on dt, B and C
        for b in range(batch):
            for v, w in ((dbc[b, :dt_rank], norm_dt), (dbc[b, dt_rank:dt_rank + n_state], norm_B),
                         (dbc[b, dt_rank + n_state:], norm_C)):
                rms_norm_row(v, w, eps, v)
    y = np.empty((batch, d_inner), dtype=np.float32)
    for c in prange(d_inner):  # in_proj's z row, dt_proj + softplus, the SSM step, D skip and SiLU(z) gate
        for b in range(batch):
            zv = row_dot(W_in, d_inner + c, x, b)
            if flags[0]:
                zv += b_in[d_inner + c]
            v = dt_bias[c]
            for i in range(dt_rank):
                v += W_dt[c, i] * dbc[b, i]
            dt = v if v > 20 else np.float32(np.log1p(np.exp(v)))
            xv = xc[b, c]
            acc = D[c] * xv
            for n in range(n_state):
                h = vexp(-dt * vexp(A_log[c, n])) * ssm[b, c, n] + dt * dbc[b, dt_rank + n] * xv
                ssm[b, c, n] = h
                acc += dbc[b, dt_rank + n_state + n] * h
            y[b, c] = acc * zv / (one + vexp(-zv))
    for r in prange(out.shape[1]):  # out_proj
        for b in range(batch):
            acc = row_dot(W_out, r, y, b)
            if flags[2]:
                acc += b_out[r]
            out[b, r] = hidden[b, r] + acc if residual else acc
    return out


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def mamba_step(residual, layer, hidden):  # pragma: no cover - compiled
    # hidden: (b, d_model) -> (b, d_model), one block (see _mamba_layer)
    return _mamba_layer(residual, layer, hidden)


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def mamba_stack(embedding, layers, final_w, final_eps, head, ids):  # pragma: no cover - compiled
    # ids: (b,) -> logits (b, vocab): the embedding, every block (``layers``: a typed List of their arguments) and
    # the final norm and LM head, one call a token
    hidden = embedding_rows(embedding, ids)
    for layer in layers:
        hidden = _mamba_layer(True, layer, hidden)
    return norm_linear_rows(final_w, final_eps, head, hidden)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _mamba2_layer(residual, layer, hidden):  # pragma: no cover - compiled
    # As _mamba_layer, for Mamba-2.  layer: a Mamba2Layer
    (block_norm_w, block_norm_eps, conv_state, ssm, W_in, b_in, conv_w, conv_b, dt_bias, A_log, D, norm_w, eps, W_out,
     b_out, flags) = layer
    # W_in: (d_inner + conv_dim + h, d_model) rows [z | x B C | dt]  conv_w: (conv_dim, k)
    # conv_state: (b, conv_dim, k)  dt_bias, A_log, D: (h,)  ssm: (b, h, p, n)  norm_w: (d_inner,)
    # W_out: (d_model, d_inner) -> out: (b, d_model).  flags: [in bias, conv bias, out bias]
    x = block_input(hidden, residual, block_norm_w, block_norm_eps)
    out = np.empty_like(hidden)
    batch = x.shape[0]
    conv_dim = conv_w.shape[0]
    n_heads, headdim, n_state = ssm.shape[1], ssm.shape[2], ssm.shape[3]
    d_inner = n_heads * headdim
    n_groups = (conv_dim - d_inner) // (2 * n_state)
    per_group = n_heads // n_groups
    one = np.float32(1.0)
    proj = np.empty((batch, W_in.shape[0]), dtype=np.float32)
    xbc = np.empty((batch, conv_dim), dtype=np.float32)
    for r in prange(W_in.shape[0]):  # in_proj; then, for an x/B/C row, its channel's causal conv and SiLU
        for b in range(batch):
            acc = row_dot(W_in, r, x, b)
            proj[b, r] = acc + b_in[r] if flags[0] else acc
            c = r - d_inner
            if 0 <= c < conv_dim:
                xbc[b, c] = _conv_silu_step(conv_state, conv_w, conv_b, flags[1], b, c, proj[b, r])
    dts = np.empty((batch, n_heads), dtype=np.float32)  # dt and exp(dt A) once per head, not per channel
    decays = np.empty((batch, n_heads), dtype=np.float32)
    for b in range(batch):
        for h in range(n_heads):
            v = proj[b, d_inner + conv_dim + h] + dt_bias[h]
            dts[b, h] = v if v > 20 else np.float32(np.log1p(np.exp(v)))
            decays[b, h] = vexp(-dts[b, h] * vexp(A_log[h]))
    y = np.empty((batch, d_inner), dtype=np.float32)
    rows = ssm.reshape(batch, d_inner, n_state)  # (head, channel) rows: the inner loop over 1-d slices vectorises
    for hp in prange(d_inner):
        h = hp // headdim
        g = h // per_group
        b_off = d_inner + g * n_state
        c_off = d_inner + n_groups * n_state + g * n_state
        for b in range(batch):
            row, B, C = rows[b, hp], xbc[b, b_off:b_off + n_state], xbc[b, c_off:c_off + n_state]
            decay, dt_x = decays[b, h], dts[b, h] * xbc[b, hp]
            acc = D[h] * xbc[b, hp]
            for n in range(n_state):
                s = decay * row[n] + dt_x * B[n]
                row[n] = s
                acc += s * C[n]
            zv = proj[b, hp]
            y[b, hp] = acc * zv / (one + vexp(-zv))  # gate before the norm (norm_before_gate=False)
    group = d_inner // n_groups
    for b in range(batch):  # grouped RMSNorm, in place
        for g in range(n_groups):
            part = y[b, g * group:(g + 1) * group]
            rms_norm_row(part, norm_w[g * group:(g + 1) * group], eps, part)
    for r in prange(out.shape[1]):
        for b in range(batch):
            acc = row_dot(W_out, r, y, b)
            if flags[2]:
                acc += b_out[r]
            out[b, r] = hidden[b, r] + acc if residual else acc
    return out


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def mamba2_step(residual, layer, hidden):  # pragma: no cover - compiled
    # hidden: (b, d_model) -> (b, d_model), one block (see _mamba2_layer)
    return _mamba2_layer(residual, layer, hidden)


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def mamba2_stack(embedding, layers, final_w, final_eps, head, ids):  # pragma: no cover - compiled
    # ids: (b,) -> logits (b, vocab), as mamba_stack
    hidden = embedding_rows(embedding, ids)
    for layer in layers:
        hidden = _mamba2_layer(True, layer, hidden)
    return norm_linear_rows(final_w, final_eps, head, hidden)

"""The linear-attention decode step in one compiled call (CPU, float32 inference).

The block's pre-norm; q/k/v (with the output gate's and GLA's low-rank gate's rows) as one parallel matrix-vector pass
over all their weight rows; the short conv; then per key/value head, in parallel, the feature maps, the decay, the
update S ← a ⊙ S + φ(k) vᵀ and the read o = Sᵀ φ(q) in one pass over S; the output norm and gate; o_proj. Its cost does
not depend on the context: the state is (h_kv, features, e) whatever the length.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from hybridlm.ops.fast_math import vexp
from hybridlm.ops.gemm.numba_ops import gemv_row, row_dot
from hybridlm.ops.linear_attention.feature_maps import NORMALIZER_EPS
from hybridlm.ops.norm.numba_ops import rms_norm_row
from hybridlm.ops.step.block import block_input
from hybridlm.ops.step.mamba import _conv_silu_step

# Codes of the options inside the kernel (numba compiles one kernel for all of them)
FEATURE_CODES = {"elu1": 0, "performer": 1, "taylor": 2, "identity": 3}
DECAY_CODES = {"none": 0, "fixed": 1, "gla": 2}
NORM_CODES = {"normalize": 0, "rms": 1, "none": 2}
NO_ROWS = np.zeros((0, 1), dtype=np.float32)  # an absent projection: a matrix of no rows


class LinearAttentionLayer(NamedTuple):
    """A linear-attention block's decode-step arguments (float32 arrays; ``EMPTY`` / ``NO_ROWS`` where absent)."""

    block_norm_w: np.ndarray  # (d_model,), the block's pre-norm (read with a residual step)
    block_norm_eps: float
    conv_state: np.ndarray  # (b, conv_dim, k) or (b, 0, 1) without a short conv; updated in place
    S: np.ndarray  # (b, h_kv, f, e), updated in place
    W_in: tuple  # (W_q (h dk, d_model), W_k (h_kv dk, ·), W_v (h_kv dv, ·), W_g (h dv, ·), W_gk_down (16, ·))
    no_bias: tuple  # EMPTY for each of W_in
    conv_w: np.ndarray  # (conv_dim, k)
    projection: np.ndarray  # (m, dk), the Performer's W
    fixed_log_decay: np.ndarray  # (h_kv,)
    W_gk_up: np.ndarray  # (h_kv f, 16), GLA's gate
    b_gk_up: np.ndarray  # (h_kv f,)
    o_norm_w: np.ndarray  # (dv,)
    o_norm_eps: float
    W_o: np.ndarray  # (d_model, h dv)
    codes: np.ndarray  # int64: [feature map, decay, norm, n_heads, key_dim, short conv?]


@njit(cache=True, inline="always")
def _features(x, kind, projection, query, out):  # pragma: no cover - compiled
    # x: (dk,) -> out: (f,), the feature map of ``ops/linear_attention/feature_maps`` (kind: FEATURE_CODES)
    d = x.shape[0]
    if kind == 0:  # elu + 1
        for i in range(d):
            out[i] = x[i] + np.float32(1.0) if x[i] > 0 else vexp(x[i])
    elif kind == 3:  # identity, queries scaled by d^-1/2
        scale = np.float32(d ** -0.5) if query else np.float32(1.0)
        for i in range(d):
            out[i] = x[i] * scale
    else:
        scale = np.float32(d ** -0.25)
        if kind == 1:  # FAVOR+: exp(W x' - |x'|^2 / 2) / sqrt(m)
            half_sq = np.float32(0.0)
            for i in range(d):
                half_sq += (x[i] * scale) ** 2
            half_sq *= np.float32(0.5)
            m = projection.shape[0]
            norm = np.float32(m ** -0.5)
            for j in range(m):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += projection[j, i] * x[i]
                out[j] = vexp(acc * scale - half_sq) * norm
        else:  # Taylor: [1, x', x' x'^T / sqrt 2]
            out[0] = np.float32(1.0)
            for i in range(d):
                out[1 + i] = x[i] * scale
            root_half = np.float32(2 ** -0.5)
            for i in range(d):
                for j in range(d):
                    out[1 + d + i * d + j] = out[1 + i] * out[1 + j] * root_half


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def linear_attention_step(residual, layer, hidden):  # pragma: no cover - compiled
    # hidden: (b, d_model), the mixer's input, or with ``residual`` the block's: out = hidden + mixer(norm(hidden))
    # layer: a LinearAttentionLayer -> out: (b, d_model)
    (block_norm_w, block_norm_eps, conv_state, S, W_in, no_bias, conv_w, projection, fixed_log_decay, W_gk_up,
     b_gk_up, o_norm_w, o_norm_eps, W_o, codes) = layer
    feature_kind, decay_kind, norm_kind, n_heads, dk, has_conv = codes
    x = block_input(hidden, residual, block_norm_w, block_norm_eps)
    out = np.empty_like(hidden)
    batch = x.shape[0]
    n_kv, f, e = S.shape[1], S.shape[2], S.shape[3]
    r = n_heads // n_kv
    dv = W_in[2].shape[0] // n_kv
    ys = (np.empty((batch, W_in[0].shape[0]), dtype=np.float32), np.empty((batch, W_in[1].shape[0]), dtype=np.float32),
          np.empty((batch, W_in[2].shape[0]), dtype=np.float32), np.empty((batch, W_in[3].shape[0]), dtype=np.float32),
          np.empty((batch, W_in[4].shape[0]), dtype=np.float32))
    no_flags = np.zeros(5, dtype=np.bool_)
    total = 0
    for W in W_in:
        total += W.shape[0]
    for row in prange(total):
        gemv_row(W_in, x, no_bias, no_flags, ys, row)
    if has_conv:  # the short conv + SiLU over the channels of [q | k | v], each in its own array
        n_q, n_k = ys[0].shape[1], ys[1].shape[1]
        for c in prange(conv_w.shape[0]):
            m = 0 if c < n_q else 1 if c < n_q + n_k else 2
            col = c - (0 if m == 0 else n_q if m == 1 else n_q + n_k)
            for b in range(batch):
                ys[m][b, col] = _conv_silu_step(conv_state, conv_w, conv_w[0], False, b, c, ys[m][b, col])
    q, k, v, g, gk = ys
    o = np.zeros((batch, n_heads, e), dtype=np.float32)
    for task in prange(batch * n_kv):  # one key/value head of one sequence: its features, decay, update and read
        b, kv = task // n_kv, task % n_kv
        phi_k = np.empty(f, dtype=np.float32)
        phi_q = np.empty((r, f), dtype=np.float32)
        _features(k[b, kv * dk:(kv + 1) * dk], feature_kind, projection, False, phi_k)
        for i in range(r):
            h = kv * r + i
            _features(q[b, h * dk:(h + 1) * dk], feature_kind, projection, True, phi_q[i])
        value = np.empty(e, dtype=np.float32)
        for j in range(dv):
            value[j] = v[b, kv * dv + j]
        if e > dv:  # the normaliser's column
            value[dv] = np.float32(1.0)
        decay = np.ones(f, dtype=np.float32)
        if decay_kind == 1:
            decay[:] = vexp(fixed_log_decay[kv])
        elif decay_kind == 2:  # GLA: exp(logsigmoid(gk W_up + b) / 16)
            for i in range(f):
                row = kv * f + i
                z = b_gk_up[row]
                for j in range(W_gk_up.shape[1]):
                    z += W_gk_up[row, j] * gk[b, j]
                log_sigmoid = min(z, np.float32(0.0)) - np.log1p(np.exp(-abs(z)))
                decay[i] = vexp(log_sigmoid / np.float32(16.0))
        state = S[b, kv]
        for i in range(f):
            a, ki = decay[i], phi_k[i]
            row = state[i]
            for j in range(e):
                row[j] = a * row[j] + ki * value[j]
            for hh in range(r):
                qi = phi_q[hh, i]
                acc_row = o[b, kv * r + hh]
                for j in range(e):
                    acc_row[j] += qi * row[j]
    y = np.empty((batch, n_heads * dv), dtype=np.float32)
    for task in prange(batch * n_heads):  # the normaliser or the norm, then the gate
        b, h = task // n_heads, task % n_heads
        head = o[b, h]
        if norm_kind == 0:
            inv = np.float32(1.0) / (head[dv] + np.float32(NORMALIZER_EPS))
            for j in range(dv):
                head[j] *= inv
        elif norm_kind == 1:
            rms_norm_row(head[:dv], o_norm_w, o_norm_eps, head[:dv])
        for j in range(dv):
            val = head[j]
            if g.shape[1]:
                gate = g[b, h * dv + j]
                val *= gate / (np.float32(1.0) + vexp(-gate))
            y[b, h * dv + j] = val
    for row in prange(out.shape[1]):  # o_proj
        for b in range(batch):
            acc = row_dot(W_o, row, y, b)
            out[b, row] = hidden[b, row] + acc if residual else acc
    return out

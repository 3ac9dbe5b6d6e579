"""The attention decode step in one compiled call (CPU, float32 inference).

q/k/v projections (one parallel matrix-vector pass, see ``gemm/numba_ops``), rotary positions, the cache write, the
attention of the new query over the cache (see ``attention/numba_ops``) and o_proj: three parallel regions and one
Python-to-numba crossing per layer, where the same step in torch ops costs ~60 small tensor operations
(views, the rotary angles, the cache slices), each a few microseconds that the weights' read does not hide.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from hybridlm.ops.attention.numba_ops import attend_heads
from hybridlm.ops.gemm.numba_ops import gemv_row
from hybridlm.ops.step.block import block_input


class AttentionLayer(NamedTuple):
    """An attention block's decode-step arguments that stay put between tokens (float32 arrays; ``EMPTY`` where
    absent). The KV cache's arrays move as it grows, so they are passed on every call."""

    block_norm_w: np.ndarray  # (d_model,), the block's pre-norm (read with a residual step)
    block_norm_eps: float
    W_qkv: tuple  # (W_q (h d, d_model), W_k (h_kv d, d_model), W_v (same))
    b_qkv: tuple  # their biases
    has_bias: np.ndarray  # (4,) bool for q, k, v, o
    inv_freq: np.ndarray  # (d / 2,), rotary frequencies
    rotary: bool
    W_o: np.ndarray  # (d_model, h d)
    b_o: np.ndarray
    per_task: int  # query heads a task (see attend_heads)


@njit(cache=True)
def _rotate_(v, n_heads, d, position, inv_freq):  # pragma: no cover - compiled
    # v: (n_heads * d,) rotated in place, the half-split layout of Hugging Face Llama: pairs (i, i + d/2)
    half = d // 2
    for i in range(half):
        angle = np.float32(position) * inv_freq[i]  # float32, as the torch path computes it
        cos, sin = np.cos(angle), np.sin(angle)
        for h in range(n_heads):
            first, second = v[h * d + i], v[h * d + half + i]
            v[h * d + i] = first * cos - second * sin
            v[h * d + half + i] = second * cos + first * sin


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def attention_step(residual, layer, positions, k_cache, v_cache, slot, n_keys, key_valid, masked, hidden
                   ):  # pragma: no cover - compiled
    # hidden: (b, d_model), the mixer's input, or with ``residual`` the block's: out = hidden + mixer(norm(hidden))
    # layer: an AttentionLayer  positions: (b,) int64, each sequence's next RoPE position
    # k_cache, v_cache: (b, h_kv, capacity, d), the new key/value written at ``slot`` (the next position; in a ring
    # buffer its slot), then the query attends to slots [0, n_keys)  key_valid: (b, capacity), the slot marked valid
    # -> out: (b, d_model)
    block_norm_w, block_norm_eps, W_qkv, b_qkv, has_bias, inv_freq, rotary, W_o, b_o, per_task = layer
    x = block_input(hidden, residual, block_norm_w, block_norm_eps)
    out = np.empty_like(hidden)
    batch = x.shape[0]
    n_kv, d = k_cache.shape[1], k_cache.shape[3]
    n_heads = W_qkv[0].shape[0] // d
    q = np.empty((batch, n_heads * d), dtype=np.float32)
    k = np.empty((batch, n_kv * d), dtype=np.float32)
    v = np.empty((batch, n_kv * d), dtype=np.float32)
    for r in prange(q.shape[1] + k.shape[1] + v.shape[1]):
        gemv_row(W_qkv, x, b_qkv, has_bias[:3], (q, k, v), r)
    for b in range(batch):
        if rotary:
            _rotate_(q[b], n_heads, d, positions[b], inv_freq)
            _rotate_(k[b], n_kv, d, positions[b], inv_freq)
        for g in range(n_kv):
            for t in range(d):
                k_cache[b, g, slot, t] = k[b, g * d + t]
                v_cache[b, g, slot, t] = v[b, g * d + t]
        if masked:  # a ring's slot may have held a padding key
            key_valid[b, slot] = True
    y = np.empty((batch, n_heads, d), dtype=np.float32)
    q_heads = q.reshape(batch, n_heads, d)
    for task in prange(batch * n_heads // per_task):
        attend_heads(q_heads, k_cache, v_cache, n_keys, key_valid, masked, y, task, per_task)
    y_flat = y.reshape(batch, n_heads * d)
    for r in prange(out.shape[1]):
        gemv_row((W_o,), y_flat, (b_o,), has_bias[3:], (out,), r)
        if residual:
            for b in range(batch):
                out[b, r] += hidden[b, r]
    return out


NO_MASK = np.ones((1, 1), dtype=np.bool_)  # key_valid's stand-in while no padding has been seen

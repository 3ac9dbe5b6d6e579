"""The attention decode step in one compiled call (CPU, float32 inference).

q/k/v projections (one parallel matrix-vector pass, see ``gemv``), rotary positions, the cache write, the
attention of the new query over the cache (see ``attention_numba``) and o_proj: three parallel regions and one
Python-to-numba crossing per layer, where the same step in torch ops costs ~60 small tensor operations
(views, the rotary angles, the cache slices), each a few microseconds that the weights' read does not hide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.attention_numba import attend_head
from hybridlm.ops.attention_step import attention_step_torch
from hybridlm.ops.gemv import gemv_row
from hybridlm.ops.numpy_views import numpy_views

if TYPE_CHECKING:
    from hybridlm.layers.attention import Attention, KVCache


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
def _attention_step(x, W_qkv, b_qkv, has_bias, inv_freq, rotary, positions, k_cache, v_cache, length, key_valid,
                    masked, W_o, b_o, out):  # pragma: no cover - compiled
    # x: (b, d_model)  W_qkv: (W_q (h d, d_model), W_k (h_kv d, d_model), W_v (same))  positions: (b,) int64
    # k_cache, v_cache: (b, h_kv, capacity, d), the new key/value written at ``length``  key_valid: (b, capacity)
    # W_o: (d_model, h d)  has_bias: (4,) bool for q, k, v, o -> out: (b, d_model)
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
                k_cache[b, g, length, t] = k[b, g * d + t]
                v_cache[b, g, length, t] = v[b, g * d + t]
    y = np.empty((batch, n_heads, d), dtype=np.float32)
    q_heads = q.reshape(batch, n_heads, d)
    for task in prange(batch * n_heads):
        attend_head(q_heads, k_cache, v_cache, length + 1, key_valid, masked, y, task)
    y_flat = y.reshape(batch, n_heads * d)
    for r in prange(out.shape[1]):
        gemv_row((W_o,), y_flat, (b_o,), has_bias[3:], (out,), r)


_EMPTY = np.zeros(1, dtype=np.float32)
_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def attention_step_numba(x: torch.Tensor, mixer: Attention, state: KVCache) -> torch.Tensor:
    # x: (b, d_model) -> (b, d_model); falls back to the torch step outside float32 CPU inference.
    w = numpy_views(mixer)
    if (w is None or x.device.type != "cpu" or x.dtype != torch.float32 or state.k.dtype != torch.float32
            or (torch.is_grad_enabled() and mixer.q_proj.weight.requires_grad)):
        return attention_step_torch(x, mixer, state)
    state.reserve(1)
    if state.key_valid is not None:
        state.key_valid[:, state.length] = True
    out = torch.empty(x.shape[0], w["o_proj.weight"].shape[0], dtype=torch.float32)
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    biases = tuple(w.get(f"{p}.bias", _EMPTY) for p in projs)
    _attention_step(
        x.detach().contiguous().numpy(), (w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]), biases[:3],
        np.array([f"{p}.bias" in w for p in projs]), w.get("rotary.inv_freq", _EMPTY), "rotary.inv_freq" in w,
        state.n_real.numpy(), state.k.numpy(), state.v.numpy(), state.length,
        _NO_MASK if state.key_valid is None else state.key_valid.numpy(), state.key_valid is not None,
        w["o_proj.weight"], biases[3], out.numpy())
    state.length += 1
    state.n_real += 1
    return out

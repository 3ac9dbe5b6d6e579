"""The attention decode step in one compiled call (CPU, float32 inference).

q/k/v projections (one parallel matrix-vector pass, see ``gemv``), rotary positions, the cache write, the
attention of the new query over the cache (see ``attention_numba``) and o_proj: three parallel regions and one
Python-to-numba crossing per layer, where the same step in torch ops costs ~60 small tensor operations
(views, the rotary angles, the cache slices), each a few microseconds that the weights' read does not hide.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.attention_numba import attend_heads, heads_per_task
from hybridlm.ops.attention_step import attention_step_torch
from hybridlm.ops.block_input import EMPTY, block_arguments, block_input, call_fused_step
from hybridlm.ops.gemv import gemv_row
from hybridlm.ops.numpy_views import kernel_arguments

if TYPE_CHECKING:
    from hybridlm.layers.attention import Attention, KVCache
    from hybridlm.layers.norm import RMSNorm


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
def _attention_step(residual, block_norm_w, block_norm_eps, W_qkv, b_qkv, has_bias, inv_freq, rotary, W_o, b_o,
                    per_task, positions, k_cache, v_cache, length, key_valid, masked, hidden
                    ):  # pragma: no cover - compiled
    # hidden: (b, d_model), the mixer's input, or with ``residual`` the block's: out = hidden + mixer(norm(hidden))
    # W_qkv: (W_q (h d, d_model), W_k (h_kv d, d_model), W_v (same))  positions: (b,) int64
    # k_cache, v_cache: (b, h_kv, capacity, d), the new key/value written at ``length``  key_valid: (b, capacity)
    # W_o: (d_model, h d)  has_bias: (4,) bool for q, k, v, o  per_task: query heads a task (see attend_heads)
    # -> out: (b, d_model)
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
                k_cache[b, g, length, t] = k[b, g * d + t]
                v_cache[b, g, length, t] = v[b, g * d + t]
    y = np.empty((batch, n_heads, d), dtype=np.float32)
    q_heads = q.reshape(batch, n_heads, d)
    for task in prange(batch * n_heads // per_task):
        attend_heads(q_heads, k_cache, v_cache, length + 1, key_valid, masked, y, task, per_task)
    y_flat = y.reshape(batch, n_heads * d)
    for r in prange(out.shape[1]):
        gemv_row((W_o,), y_flat, (b_o,), has_bias[3:], (out,), r)
        if residual:
            for b in range(batch):
                out[b, r] += hidden[b, r]
    return out


_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def _attention_arguments(mixer: Attention, w: dict[str, np.ndarray]) -> tuple:
    # _attention_step's arguments from W_qkv to b_o
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    biases = tuple(w.get(f"{p}.bias", EMPTY) for p in projs)
    return ((w["q_proj.weight"], w["k_proj.weight"], w["v_proj.weight"]), biases[:3],
            np.array([f"{p}.bias" in w for p in projs]), w.get("rotary.inv_freq", EMPTY), "rotary.inv_freq" in w,
            w["o_proj.weight"], biases[3])


def bind_attention_step(mixer: Attention, state: KVCache, norm: RMSNorm | None = None
                        ) -> Callable[[np.ndarray], np.ndarray] | None:
    """``mixer``'s decode step as a call on float32 arrays, hidden (b, d_model) -> (b, d_model), with its weights,
    the KV cache ``state`` and the block's ``norm`` (for ``hidden + mixer(norm(hidden))``) bound; None outside the
    kernel's domain (float32 CPU tensors). Each call appends to the cache, growing it when full."""
    args = kernel_arguments(mixer, _attention_arguments)
    block = block_arguments(norm)
    if args is None or block is None or state.k.dtype != torch.float32 or state.k.device.type != "cpu":
        return None
    per_task = heads_per_task(state.k.shape[0], mixer.n_heads, mixer.n_kv_heads, numba.get_num_threads())
    kernel = partial(_attention_step, *block, *args, per_task)

    def step(hidden: np.ndarray) -> np.ndarray:
        state.reserve(1)  # may move the cache: its arrays are looked up on every call
        valid = state.key_valid
        if valid is not None:
            valid[:, state.length] = True
        out = kernel(state.n_real.numpy(), state.k.numpy(), state.v.numpy(), state.length,
                     _NO_MASK if valid is None else valid.numpy(), valid is not None, hidden)
        state.length += 1
        state.n_real += 1
        return out

    return step


def attention_step_numba(x: torch.Tensor, mixer: Attention, state: KVCache, norm: RMSNorm | None = None
                         ) -> torch.Tensor:
    # x: (b, d_model) -> (b, d_model), x + mixer(norm(x)) with ``norm``; the torch step outside float32 CPU inference
    return call_fused_step(bind_attention_step, attention_step_torch, x, mixer, state, norm)

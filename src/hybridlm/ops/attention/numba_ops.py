"""One new query per sequence over the KV cache (a decode step's attention), for CPU inference.

The kernel reads each key and value row once, in one streaming pass per KV head: the query heads that share it
under GQA take it together (once per query head, a model with 3 heads per KV head read its cache 3x). A decode
step's attention is bound by reading the cache, and SDPA's CPU kernel, made for blocks of queries, stays well
short of that read (docs/performance.md, "Figures behind the kernels").
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.attention.torch_ops import decode_attention_torch
from hybridlm.ops.fast_math import vexp

KEY_BLOCK = 256  # keys (and values) a task's heads take in turn while the block is in L1/L2: 64 KiB at d = 64


@njit(cache=True, inline="always")
def attend_heads(q, k, v, length, key_valid, masked, out, task, heads_per_task):  # pragma: no cover - compiled
    # q, out: (b, h, d)  k, v: (b, h_kv, capacity, d)  key_valid: (b, capacity) bool, read when masked
    # -> out[b, h] for the ``heads_per_task`` query heads of task (b, KV head g, part of g's heads):
    # softmax(q k^T / sqrt(d)) v over the first ``length`` keys. The heads that share a KV head (GQA) take each
    # block of keys and values in turn while it is in cache, so the cache is read from memory once between them;
    # each head's arithmetic is in the order of one head alone. A helper for prange loops over tasks (see
    # gemv_row on why it is not a parallel function of its own).
    n_heads, n_kv, d = q.shape[1], k.shape[1], q.shape[2]
    parts = n_heads // n_kv // heads_per_task  # tasks per KV head
    b, rest = task // (n_kv * parts), task % (n_kv * parts)
    g, part = rest // parts, rest % parts
    h0 = g * (n_heads // n_kv) + part * heads_per_task
    scale = np.float32(1.0 / math.sqrt(d))
    weights = np.empty((heads_per_task, length), dtype=np.float32)
    top = np.full(heads_per_task, -np.inf, dtype=np.float32)
    for start in range(0, length, KEY_BLOCK):
        stop = min(start + KEY_BLOCK, length)
        for i in range(heads_per_task):
            qh, row, m = q[b, h0 + i], weights[i], top[i]
            for j in range(start, stop):
                key = k[b, g, j]
                s = np.float32(0.0)
                for t in range(d):
                    s += qh[t] * key[t]
                s *= scale
                if masked and not key_valid[b, j]:
                    s = np.float32(-np.inf)
                row[j] = s
                m = max(m, s)
            top[i] = m
    total = np.zeros(heads_per_task, dtype=np.float32)
    for i in range(heads_per_task):
        row, m, sum_e = weights[i], top[i], np.float32(0.0)
        for j in range(length):  # masked keys weigh exactly 0 (vexp clamps -inf to exp(-87), not 0)
            e = vexp(row[j] - m) if row[j] > -np.inf else np.float32(0.0)
            row[j] = e
            sum_e += e
        total[i] = sum_e
    acc = np.zeros((heads_per_task, d), dtype=np.float32)
    for start in range(0, length, KEY_BLOCK):
        stop = min(start + KEY_BLOCK, length)
        for i in range(heads_per_task):
            row, acc_i = weights[i], acc[i]
            for j in range(start, stop):
                w, value = row[j], v[b, g, j]
                for t in range(d):
                    acc_i[t] += w * value[t]
    for i in range(heads_per_task):
        dst = out[b, h0 + i]
        for t in range(d):
            dst[t] = acc[i, t] / total[i]


def heads_per_task(batch: int, n_heads: int, n_kv: int, threads: int) -> int:
    """How many query heads of one KV head each task of ``attend_heads`` takes: all of them (each key and value
    read once) unless that leaves fewer tasks than threads; then the KV head's heads are split into as few parts
    as give every thread a task."""
    group = n_heads // n_kv
    for parts in range(1, group + 1):
        if group % parts == 0 and batch * n_kv * parts >= threads:
            return group // parts
    return 1


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def _decode_attention(q, k, v, length, key_valid, masked, out, per_task):  # pragma: no cover - compiled
    # q, out: (b, h, d)  k, v: (b, h_kv, capacity, d)  key_valid: (b, capacity) bool, read when masked
    for task in prange(q.shape[0] * q.shape[1] // per_task):
        attend_heads(q, k, v, length, key_valid, masked, out, task, per_task)


_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def decode_attention_numba(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                           key_valid: torch.Tensor | None = None) -> torch.Tensor:
    # Same contract as decode_attention_torch; CPU float32 without autograd, otherwise that function.
    if (q.dtype != torch.float32 or k_cache.dtype != torch.float32 or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or q.shape[2] != 1 or length == 0
            or (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad))):
        return decode_attention_torch(q, k_cache, v_cache, length, key_valid)
    out = torch.empty_like(q)
    mask = _NO_MASK if key_valid is None else key_valid.contiguous().numpy()
    per_task = heads_per_task(q.shape[0], q.shape[1], k_cache.shape[1], numba.get_num_threads())
    _decode_attention(q.detach()[:, :, 0].contiguous().numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
                      length, mask, key_valid is not None, out[:, :, 0].numpy(), per_task)
    return out

"""Attention through ``scaled_dot_product_attention``, sharing KV heads (GQA), its sliding-window (banded) form and
its decode-step form.

``sliding_window_attention`` is local causal attention over a long sequence without an (l, s) mask: blocks of queries,
each against the keys its window reaches. ``decode_attention_torch`` is one new query per sequence over the filled part
of a KV cache; the numba kernel in ``attention/numba_ops`` is its fast CPU form. ``attention/reference`` holds the
banded attention as an obviously correct loop, the tests' oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# scaled_dot_product_attention shares KV heads itself from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    # q: (b, h, l, d)  k, v: (b, h_kv, s, d) with h a multiple of h_kv  attn_mask: broadcastable to (b, h, l, s)
    # -> (b, h, l, d)
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=attn_mask, is_causal=is_causal)


# Queries a block of sliding_window_attention. Each block also reads the window - 1 keys before it, so a small block
# wastes little work on a wide window (128 + 4095 keys for 128 queries at window 4096), and its mask stays small;
# on this machine (2 threads, 8K tokens, 12 heads of 64) 64-256 are within 10% of each other at windows 64-4096.
QUERY_BLOCK = 128


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_valid: torch.Tensor | None = None, block: int = QUERY_BLOCK) -> torch.Tensor:
    # q: (b, h, l, d)  k, v: (b, h_kv, s, d) with s >= l: the queries are the last l positions of the keys'
    # sequence (query i at key position s - l + i)  key_valid: (b, s) bool or None (every key real) -> (b, h, l, d)
    # Query position p sees keys p - window < j <= p that are real, and always itself (a padding query's row is
    # never empty: no NaN). Each block of queries runs SDPA over the keys its window reaches, with a band mask of
    # (block, block + window - 1): memory and work grow with l * window, never l * s. Differentiable.
    length, keys = q.shape[2], k.shape[2]
    offset = keys - length
    if window >= keys and key_valid is None and offset == 0:  # the window reaches every key: causal attention
        return sdpa(q, k, v, None, length > 1)
    return torch.cat([_banded_block(q[:, :, start:start + block], k, v, offset + start, window, key_valid)
                      for start in range(0, length, block)], 2)


def _banded_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, window: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    # q: (b, h, n, d) the queries at key positions [first, first + n)  k, v: (b, h_kv, s, d)  key_valid: (b, s)
    # -> (b, h, n, d), attending to keys [first - window + 1, first + n) through a band mask
    lo, hi = max(0, first - window + 1), first + q.shape[2]
    distance = torch.arange(first, hi, device=q.device)[:, None] - torch.arange(lo, hi, device=q.device)
    mask = (distance >= 0) & (distance < window)
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, lo:hi]) | (distance == 0)
    return sdpa(q, k[:, :, lo:hi], v[:, :, lo:hi], mask)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                           key_valid: torch.Tensor | None = None) -> torch.Tensor:
    # q: (b, h, 1, d)  k_cache, v_cache: (b, h_kv, capacity, d), positions [0, length) filled
    # key_valid: (b, capacity) bool or None (every key valid) -> (b, h, 1, d)
    mask = None if key_valid is None else key_valid[:, None, None, :length]
    return sdpa(q, k_cache[:, :, :length], v_cache[:, :, :length], mask)

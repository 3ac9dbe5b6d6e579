"""Attention through ``scaled_dot_product_attention``, sharing KV heads (GQA), and its decode-step form.

``decode_attention_torch`` is one new query per sequence over the filled part of a KV cache; the numba
kernel in ``attention/numba_ops`` is its fast CPU form.
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


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                           key_valid: torch.Tensor | None = None) -> torch.Tensor:
    # q: (b, h, 1, d)  k_cache, v_cache: (b, h_kv, capacity, d), positions [0, length) filled
    # key_valid: (b, capacity) bool or None (every key valid) -> (b, h, 1, d)
    mask = None if key_valid is None else key_valid[:, None, None, :length]
    return sdpa(q, k_cache[:, :, :length], v_cache[:, :, :length], mask)

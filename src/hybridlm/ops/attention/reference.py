"""Sliding-window (banded) causal attention as an obviously correct loop: the tests' oracle for
``torch_ops.sliding_window_attention`` and the KV cache's ring buffer."""

from __future__ import annotations

import math

import torch


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
    # q: (b, h, l, d)  k, v: (b, h_kv, s, d) with s >= l, query i at key position s - l + i  key_valid: (b, s) bool
    # -> (b, h, l, d). Query position p attends to keys j with p - window < j <= p (all j <= p when window is None)
    # that are real, and always to itself; one query and one head at a time, in float64.
    b, h, length, d = q.shape
    keys, group = k.shape[2], h // k.shape[1]
    out = torch.empty(b, h, length, d, dtype=torch.float64)
    for row in range(b):
        for head in range(h):
            for i in range(length):
                p = keys - length + i
                seen = [j for j in range(p + 1) if (window is None or p - j < window)
                        and (key_valid is None or bool(key_valid[row, j]) or j == p)]
                kk = k[row, head // group, seen].double()
                vv = v[row, head // group, seen].double()
                weights = torch.softmax(kk @ q[row, head, i].double() / math.sqrt(d), 0)
                out[row, head, i] = weights @ vv
    return out.to(q.dtype)

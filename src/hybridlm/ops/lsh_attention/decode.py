"""One LSH-attention decode step: the new token's query against the keys in its buckets' rings (the ``chunk`` most
recent keys of its bucket in each round, itself included), merged as the sequence form merges the rounds, so prefill
then decode equals one forward over the whole. Reads at most n_rounds * chunk keys: no work grows with the context."""

from __future__ import annotations

import math

import torch

from hybridlm.ops.lsh_attention.sorted_chunks import SELF_SCORE


def lsh_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         own_slot: int, exclude_self: bool = True) -> torch.Tensor:
    # q: (b, h, 1, d) the new token's query  k_cache: (b, h, capacity, d) unit keys  v_cache: (b, h, capacity, e)
    # slots: (b, h, r, c) the cache slots of each round's keys (-1: an empty place)  own_slot: the new key's slot
    # -> (b, h, 1, e)
    b, h, rounds, c = slots.shape
    d, e = q.shape[-1], v_cache.shape[-1]
    kept = slots >= 0
    flat = slots.clamp(min=0).reshape(b, h, rounds * c, 1)
    keys = k_cache.gather(2, flat.expand(-1, -1, -1, d)).view(b, h, rounds, c, d)
    values = v_cache.gather(2, flat.expand(-1, -1, -1, e)).view(b, h, rounds, c, e)
    scores = (keys @ (q[:, :, 0, :, None] / math.sqrt(d))[:, :, None])[..., 0]  # (b, h, r, c)
    if exclude_self:
        scores = scores.masked_fill(slots == own_slot, SELF_SCORE)
    scores = scores.masked_fill(~kept, float("-inf"))
    lse = scores.logsumexp(-1)  # (b, h, r): each ring holds the new key, so it is finite
    o = (torch.softmax(scores, -1)[..., None] * values).sum(-2)  # (b, h, r, e)
    return (torch.softmax(lse, -1)[..., None] * o).sum(2)[:, :, None]

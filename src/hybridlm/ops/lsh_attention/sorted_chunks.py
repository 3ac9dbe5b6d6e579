"""LSH attention over a sequence, Reformer's way: per hash round, sort the tokens by (bucket, position), cut the
sorted sequence into chunks, and let each chunk's queries attend to the keys of its chunk and of the one before.
Each query keeps the keys of its bucket at most ``chunk - 1`` sorted places before it (see the package docstring):
exactly the ``chunk`` most recent keys of its bucket, which the two chunks always hold. Work and memory grow with
l · chunk per round, never l². Differentiable (sorting indices carry no gradient; gathers and matmuls do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A token's score against its own key when queries and keys are shared: q·q/|q| would dominate its row, so Reformer
# keeps a token from attending to itself unless nothing else is in reach (its code uses -1e5 in float32).
SELF_SCORE = -1e5
# The bucket of padding keys: past every real bucket, so no real query shares it
PADDING_BUCKET = 1 << 30


def lsh_attention_sorted(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                         key_valid: torch.Tensor | None = None, exclude_self: bool = True) -> torch.Tensor:
    # qk: (b, h, l, d) shared queries and keys (keys are qk / |qk|)  v: (b, h, l, e)  buckets: (b, h, r, l) int64
    # key_valid: (b, l) bool or None -> (b, h, l, e). Round by round, each chunk beside the one before it; the rounds
    # are merged by their normalisers (a round's output weighs exp(its logsumexp) over all rounds'), as Reformer does.
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk}")
    b, h, length, d = qk.shape
    keys = F.normalize(qk, dim=-1)
    if key_valid is not None:
        buckets = torch.where(key_valid[:, None, None, :], buckets, PADDING_BUCKET)
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk
    e = v.shape[-1]
    positions = torch.arange(length, device=qk.device)
    ranks = torch.arange(padded, device=qk.device).view(n_chunks, chunk)
    key_ranks = torch.cat([ranks - chunk, ranks], 1)  # (n, 2c): the previous chunk, then this one
    gap = ranks[:, :, None] - key_ranks[:, None, :]  # (n, c, 2c): sorted places from key to query
    in_reach = (gap >= 0) & (gap < chunk) & (key_ranks[:, None, :] >= 0)
    # One row gather a round moves queries (scaled), keys and values together
    width = 2 * d + e
    packed = torch.cat([qk / math.sqrt(d), keys, v], -1).reshape(b * h * length, width)
    base = (torch.arange(b * h, device=qk.device) * length).view(b, h, 1)
    outs, lses = [], []
    for r in range(buckets.shape[2]):
        order = (buckets[:, :, r] * length + positions).argsort(-1)  # (b, h, l): by bucket, then position
        sorted_bucket = buckets[:, :, r].gather(-1, order)
        if padded > length:  # slots past the end: a bucket of their own (-1), their outputs dropped
            order = torch.cat([order, order.new_zeros(b, h, padded - length)], -1)
            sorted_bucket = torch.cat([sorted_bucket, sorted_bucket.new_full((b, h, padded - length), -1)], -1)
        rows = packed.index_select(0, (order + base).flatten()).view(b, h, padded, width)
        # An empty chunk in front, then windows of two chunks a chunk apart: views, no copies of the keys
        windows = torch.cat([rows.new_zeros(b, h, chunk, width), rows], 2).unfold(2, 2 * chunk, chunk)
        q_c = rows[..., :d].view(b, h, n_chunks, chunk, d)
        k_w, v_w = windows[..., d:2 * d, :], windows[..., 2 * d:, :].transpose(-1, -2)  # (b, h, n, ·, 2c)
        bucket_c = sorted_bucket.view(b, h, n_chunks, chunk)
        bucket_w = torch.cat([sorted_bucket.new_full((b, h, chunk), -2), sorted_bucket], -1).unfold(-1, 2 * chunk,
                                                                                                     chunk)
        seen = in_reach & (bucket_c[..., :, None] == bucket_w[..., None, :])  # (b, h, n, c, 2c)
        scores = torch.where(seen, q_c @ k_w, float("-inf"))
        if exclude_self:  # gap 0: the diagonal of the second half
            own = torch.eye(chunk, dtype=torch.bool, device=qk.device)
            scores = torch.where(torch.cat([torch.zeros_like(own), own], 1), SELF_SCORE, scores)
        top = scores.amax(-1, keepdim=True)  # finite: every row sees itself
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        o = (weights / total) @ v_w  # (b, h, n, c, e)
        lse = top + total.log()
        inverse = order[..., :length].argsort(-1) + (base // length) * padded  # sorted place of each position
        o_lse = torch.cat([o, lse], -1).reshape(b * h * padded, e + 1).index_select(0, inverse.flatten())
        o_lse = o_lse.view(b, h, length, e + 1)
        outs.append(o_lse[..., :e])
        lses.append(o_lse[..., e])
    weights = torch.softmax(torch.stack(lses), 0)  # (r, b, h, l)
    return (weights[..., None] * torch.stack(outs)).sum(0)

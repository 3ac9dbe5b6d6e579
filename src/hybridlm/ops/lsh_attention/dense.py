"""LSH attention and the exact attention it approximates, as rows over every key: the bench's error measures.

``shared_qk_attention`` is Reformer's attention without hashing (every earlier key, the token's own score
SELF_SCORE), in query blocks so that memory stays O(block · l); ``*_rows`` give the weights a few queries put on every
key, for the error of the attention rows themselves."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridlm.ops.lsh_attention.sorted_chunks import SELF_SCORE

QUERY_BLOCK = 256


def shared_qk_scores(qk: torch.Tensor, rows: torch.Tensor, exclude_self: bool = True) -> torch.Tensor:
    # qk: (b, h, l, d)  rows: (n,) query positions -> (b, h, n, l): q·k/|k| / √d over keys j <= row (-inf after),
    # the token's own SELF_SCORE when exclude_self
    keys = F.normalize(qk, dim=-1)
    scores = qk[:, :, rows] @ keys.transpose(-1, -2) / math.sqrt(qk.shape[-1])
    positions = torch.arange(qk.shape[2], device=qk.device)
    if exclude_self:
        scores = scores.masked_fill(positions == rows[:, None], SELF_SCORE)
    return scores.masked_fill(positions > rows[:, None], float("-inf"))


def shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, exclude_self: bool = True, block: int = QUERY_BLOCK
                        ) -> torch.Tensor:
    # qk: (b, h, l, d)  v: (b, h, l, e) -> (b, h, l, e): exact causal shared-QK attention, a block of queries at a time
    length = qk.shape[2]
    outs = []
    for start in range(0, length, block):
        rows = torch.arange(start, min(start + block, length), device=qk.device)
        keys = int(rows[-1]) + 1  # later keys are masked for every query of the block
        scores = shared_qk_scores(qk[:, :, :keys], rows, exclude_self)
        outs.append(torch.softmax(scores, -1) @ v[:, :, :keys])
    return torch.cat(outs, 2)


def shared_qk_rows(qk: torch.Tensor, rows: torch.Tensor, exclude_self: bool = True) -> torch.Tensor:
    # -> (b, h, n, l): the exact attention rows of queries ``rows``
    return torch.softmax(shared_qk_scores(qk, rows, exclude_self), -1)


def lsh_attention_rows(qk: torch.Tensor, buckets: torch.Tensor, chunk: int, rows: torch.Tensor,
                       exclude_self: bool = True) -> torch.Tensor:
    # qk: (b, h, l, d)  buckets: (b, h, r, l)  rows: (n,) -> (b, h, n, l): the weights LSH attention puts on every key
    # for queries ``rows``: per round a softmax over the `chunk` most recent keys of the query's bucket, the rounds
    # merged by their normalisers (as sorted_chunks)
    scores = shared_qk_scores(qk, rows, exclude_self)[:, :, None]  # (b, h, 1, n, l)
    same = buckets[..., None, :] == buckets[..., rows, None]  # (b, h, r, n, l)
    same &= torch.arange(qk.shape[2], device=qk.device) <= rows[:, None]
    seen_up_to = same.cumsum(-1)  # same-bucket keys in [0, j]
    recent = seen_up_to.gather(-1, rows[None, None, None, :, None].expand(*same.shape[:-1], 1)) - seen_up_to + same
    scores = scores.masked_fill(~(same & (recent <= chunk)), float("-inf"))  # (b, h, r, n, l)
    weights = torch.softmax(scores.logsumexp(-1), 2)  # (b, h, r, n): each round's share
    return (weights[..., None] * torch.softmax(scores, -1)).sum(2)

"""LSH attention written per query as a loop in float64: the key sets spelt out, the oracle of ``sorted_chunks``."""

from __future__ import annotations

import math

import torch

from hybridlm.ops.lsh_attention.sorted_chunks import SELF_SCORE


def lsh_attention_reference(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                            key_valid: torch.Tensor | None = None, exclude_self: bool = True) -> torch.Tensor:
    # qk: (b, h, l, d) shared queries and keys  v: (b, h, l, e)  buckets: (b, h, r, l)  key_valid: (b, l) or None
    # -> (b, h, l, e). In round r query i sees the `chunk` most recent real keys j <= i whose bucket is its own (a
    # padding query: the padding keys), itself included; keys are qk / |qk|; its own score is SELF_SCORE when
    # exclude_self (it counts only when alone). The rounds are merged by their softmax normalisers.
    b, h, length, d = qk.shape
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    keys = torch.nn.functional.normalize(qk.double(), dim=-1)
    for row in range(b):
        real = [True] * length if key_valid is None else [bool(x) for x in key_valid[row]]
        for head in range(h):
            for i in range(length):
                outs, lses = [], []
                for r in range(buckets.shape[2]):
                    bucket = buckets[row, head, r]
                    same = [j for j in range(i + 1) if real[j] == real[i] and (not real[i] or bucket[j] == bucket[i])]
                    seen = same[-chunk:]
                    scores = keys[row, head, seen] @ qk[row, head, i].double() / math.sqrt(d)
                    if exclude_self:
                        scores[-1] = SELF_SCORE  # seen ends with i itself
                    lses.append(torch.logsumexp(scores, 0))
                    outs.append(torch.softmax(scores, 0) @ v[row, head, seen].double())
                weights = torch.softmax(torch.stack(lses), 0)
                out[row, head, i] = (weights[:, None] * torch.stack(outs)).sum(0)
    return out.to(qk.dtype)

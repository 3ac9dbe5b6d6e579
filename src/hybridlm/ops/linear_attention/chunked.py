"""Linear attention in chunks: matmuls within a chunk, the state passed from chunk to chunk (plain torch, autograd).

The sequence is cut into chunks of C positions. Within a chunk the outputs are a masked, decayed attention
(q kᵀ ⊙ D) v, with D[t, s] = exp(Λ_t − Λ_s) for s ≤ t and Λ the cumulative log decay inside the chunk; across chunks
one state S (f × e per key/value head) carries everything before: o_t += (q_t ⊙ exp(Λ_t)) S. That is O(L·C) work
where the quadratic form is O(L²), and unlike the recurrence it is made of matmuls. Every decay factor formed is
exp of a non-positive number, so no chunk length or gate can overflow it (the form that scales q by exp(Λ) and k by
exp(−Λ) overflows once Λ < −88). A decay per key feature (GLA) makes D a (C, C, f) tensor per chunk: kept small
by its own chunk length, ``PER_FEATURE_CHUNK``. Chunk-parallel as flash-linear-attention's ``chunk`` kernels are
(Yang et al. 2024, section 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PER_FEATURE_CHUNK = 16  # positions a chunk with a decay per key feature: its D is (C, C, f)


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             log_decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                             chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    # q: (b, h, l, f)  k: (b, h_kv, l, f)  v: (b, h_kv, l, e)  log_decay: None, (b, h_kv, l) or (b, h_kv, l, f)
    # initial_state: (b, h_kv, f, e) -> o: (b, h, l, e), final state (b, h_kv, f, e) (float32 or better)
    b, h, length, f = q.shape
    h_kv, e = k.shape[1], v.shape[-1]
    r = h // h_kv
    per_feature = log_decay is not None and log_decay.dim() == 4
    C = max(1, min(PER_FEATURE_CHUNK if per_feature else chunk_size, length))
    pad = -length % C
    if pad:  # zero keys and values add nothing to the state, a zero log decay keeps it
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if log_decay is not None:
            log_decay = F.pad(log_decay, (0, 0, 0, pad) if per_feature else (0, pad))
    n = (length + pad) // C
    qc = q.reshape(b, h_kv, r, n, C, f)
    kc, vc = k.reshape(b, h_kv, n, C, f), v.reshape(b, h_kv, n, C, e)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    state_dtype = torch.promote_types(q.dtype, torch.float32)

    if log_decay is None:
        scores = (qc @ kc.transpose(-1, -2)[:, :, None]).masked_fill(~causal, 0)  # (b, h_kv, r, n, C, C)
        k_end, q_start, chunk_decay = kc, qc, None
    elif not per_feature:  # one decay a head: D is (C, C)
        cum = log_decay.reshape(b, h_kv, n, C).to(state_dtype).cumsum(-1)  # Λ
        D = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -torch.inf))
        scores = (qc @ kc.transpose(-1, -2)[:, :, None]) * D[:, :, None].to(q.dtype)
        k_end = kc * torch.exp(cum[..., -1:] - cum)[..., None].to(k.dtype)  # decayed to the chunk's end
        q_start = qc * torch.exp(cum)[:, :, None, ..., None].to(q.dtype)  # decayed from the chunk's start
        chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # (b, h_kv, n, 1, 1)
    else:  # one decay a head and key feature: D is (C, C, f)
        cum = log_decay.reshape(b, h_kv, n, C, f).to(state_dtype).cumsum(-2)
        D = torch.exp((cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~causal[..., None], -torch.inf))
        kD = (D.to(k.dtype) * kc[..., None, :, :]).transpose(-1, -2)  # (b, h_kv, n, t, f, s)
        scores = (qc.permute(0, 1, 3, 4, 2, 5) @ kD).permute(0, 1, 4, 2, 3, 5)  # (b, h_kv, r, n, t, s)
        k_end = kc * torch.exp(cum[..., -1:, :] - cum).to(k.dtype)
        q_start = qc * torch.exp(cum)[:, :, None].to(q.dtype)
        chunk_decay = torch.exp(cum[..., -1, :])[..., None]  # (b, h_kv, n, f, 1)

    o = scores @ vc[:, :, None]  # within the chunk: (b, h_kv, r, n, C, e)
    updates = (k_end.transpose(-1, -2) @ vc).to(state_dtype)  # each chunk's own contribution: (b, h_kv, n, f, e)
    S = (torch.zeros(b, h_kv, f, e, dtype=state_dtype, device=q.device) if initial_state is None
         else initial_state.to(state_dtype))
    starts = []
    for i in range(n):  # n = l / C steps of an (f, e) update: the sequential part
        starts.append(S)
        S = (S if chunk_decay is None else S * chunk_decay[:, :, i]) + updates[:, :, i]
    o = o + q_start @ torch.stack(starts, 2)[:, :, None].to(q.dtype)  # what came before the chunk
    return o.reshape(b, h, n * C, e)[:, :, :length], S


def linear_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                               chunk_size: int = 0, query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    # As linear_attention_chunked, with the outputs as one masked product (q kᵀ ⊙ D) v over the whole sequence
    # (a block of queries at a time, so memory stays O(l · query_block)): the form a Transformer's attention has,
    # O(l²). For a decay per head or none; the bench's baseline. -> o: (b, h, l, e), final state
    b, h, length, f = q.shape
    h_kv, e = k.shape[1], v.shape[-1]
    if initial_state is not None or (log_decay is not None and log_decay.dim() == 4):
        raise ValueError("linear_attention_quadratic: expected no initial_state and a decay per head or none")
    r = h // h_kv
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    cum = (torch.zeros(b, h_kv, length, dtype=state_dtype, device=q.device) if log_decay is None
           else log_decay.to(state_dtype).cumsum(-1))
    qg = q.reshape(b, h_kv, r, length, f)
    outs = []
    for start in range(0, length, query_block):
        stop = min(start + query_block, length)
        rows = torch.arange(start, stop, device=q.device)[:, None]
        keys = torch.arange(stop, device=q.device)
        D = torch.exp((cum[..., start:stop, None] - cum[..., None, :stop]).masked_fill(keys > rows, -torch.inf))
        scores = (qg[..., start:stop, :] @ k[:, :, None, :stop].transpose(-1, -2)) * D[:, :, None].to(q.dtype)
        outs.append(scores @ v[:, :, None, :stop])
    o = torch.cat(outs, dim=-2).reshape(b, h, length, e)
    decay_to_end = torch.exp(cum[..., -1:] - cum)[..., None].to(k.dtype)
    return o, ((k * decay_to_end).transpose(-1, -2) @ v).to(state_dtype)

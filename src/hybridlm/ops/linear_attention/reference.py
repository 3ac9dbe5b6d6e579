"""Linear attention as its recurrence, one position at a time in float64: the tests' oracle.

    S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ        o_t = S_tᵀ q_t

with the feature maps already applied to q and k (``feature_maps``), ``a_t = exp(log_decay_t)`` a decay per head
(RetNet) or per head and key feature (GLA), or 1 (no decay), and several query heads sharing one key/value head (GQA).
"""

from __future__ import annotations

import torch


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                               chunk_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # q: (b, h, l, f)  k: (b, h_kv, l, f)  v: (b, h_kv, l, e)
    # log_decay: None, (b, h_kv, l) per head, or (b, h_kv, l, f) per head and key feature; <= 0
    # initial_state: (b, h_kv, f, e)  (chunk_size: unused, the chunked form's parameter)
    # -> o: (b, h, l, e) in q's dtype, final state: (b, h_kv, f, e) (float32 or better)
    b, h, length, f = q.shape
    h_kv, e = k.shape[1], v.shape[-1]
    r = h // h_kv
    S = (torch.zeros(b, h_kv, f, e, dtype=torch.float64, device=q.device) if initial_state is None
         else initial_state.double().clone())
    o = torch.empty(b, h, length, e, dtype=torch.float64, device=q.device)
    for t in range(length):
        if log_decay is not None:
            a = torch.exp(log_decay[:, :, t].double())
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None])
        S = S + k[:, :, t, :, None].double() * v[:, :, t, None, :].double()
        q_t = q[:, :, t].double().view(b, h_kv, r, f)
        o[:, :, t] = torch.einsum("bgrf,bgfe->bgre", q_t, S).reshape(b, h, e)
    return o.to(q.dtype), S.to(torch.promote_types(q.dtype, torch.float32))

"""One decode step of an attention mixer: (b, d_model) in, (b, d_model) out, the new key and value appended to
the KV cache in place.

``attention_step_torch`` is the plain version (any device and dtype); ``attention_step_numba`` the fused CPU
kernel. Given the block's pre-norm (``norm``), a step is the block's whole residual update, ``x + mixer(norm(x))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybridlm.layers.attention import Attention, KVCache
    from hybridlm.layers.norm import RMSNorm


def attention_step_torch(x: torch.Tensor, mixer: Attention, state: KVCache, norm: RMSNorm | None = None
                         ) -> torch.Tensor:
    # x: (b, d_model) -> (b, d_model); reads the cache once, no tensor shaped by the context is made.
    from hybridlm import ops

    if norm is not None:
        return x + attention_step_torch(norm(x), mixer, state)

    b, hd = x.shape[0], mixer.head_dim
    projs = (mixer.q_proj, mixer.k_proj, mixer.v_proj)
    q, k, v = ops.linears(x, tuple(p.weight for p in projs), tuple(p.bias for p in projs))
    q = q.view(b, mixer.n_heads, 1, hd)
    k = k.view(b, mixer.n_kv_heads, 1, hd)
    v = v.view(b, mixer.n_kv_heads, 1, hd)
    if mixer.rotary is not None:
        q, k = mixer.rotary(q, k, state.n_real[:, None])
    state.append(k, v, None)
    state.n_real += 1
    y = ops.decode_attention(q, state.k, state.v, state.length, state.key_valid)
    return mixer.o_proj(y.view(b, mixer.n_heads * hd))

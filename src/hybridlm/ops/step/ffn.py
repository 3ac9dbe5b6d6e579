"""A block's feed-forward half of a decode step as one compiled call: ``hidden + ffn(ffn_norm(hidden))``.

For the SwiGLU feed-forward (Llama) and the top-k mixture of SwiGLU experts (Mixtral, Jamba): the RMSNorm, the
router (its softmax, top-k and the load-balancing loss), the chosen experts' matrix-vector products and the
residual add in one kernel (CPU, float32 inference). Through the modules, a MoE decode step took ~15 small torch
ops and a Python loop over its experts, and each met caches that the weight stream had just emptied.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from hybridlm.ops.gemm.numba_ops import row_dot, swiglu_rows
from hybridlm.ops.step.block import block_input

_FASTMATH = {"contract", "arcp", "nsz", "reassoc"}


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def mlp_step(norm_w, norm_eps, W_gate, W_up, W_down, hidden):  # pragma: no cover - compiled
    # hidden: (b, d) -> hidden + swiglu(rmsnorm(hidden)), no auxiliary loss.  W_gate, W_up: (f, d)  W_down: (d, f)
    x = block_input(hidden, True, norm_w, norm_eps)
    out = np.empty_like(hidden)
    swiglu_rows(x, W_gate, W_up, W_down, out)
    out += hidden
    return out, 0.0


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def moe_step(norm_w, norm_eps, W_router, W_gate, W_up, W_down, top_k, normalize, hidden):  # pragma: no cover
    # hidden: (b, d) -> hidden + moe(rmsnorm(hidden)), the load-balancing loss (as MoE._balance_loss)
    # W_router: (e, d)  W_gate, W_up: (e, f, d)  W_down: (e, d, f)
    x = block_input(hidden, True, norm_w, norm_eps)
    batch, n_experts = x.shape[0], W_router.shape[0]
    probs = np.empty((batch, n_experts), dtype=np.float32)
    counts = np.zeros(n_experts, dtype=np.float64)
    out = hidden.copy()
    y = np.empty((1, hidden.shape[1]), dtype=np.float32)
    for b in range(batch):
        logits = np.empty(n_experts, dtype=np.float32)
        for e in range(n_experts):
            logits[e] = row_dot(W_router, e, x, b)
        p = np.exp(logits - logits.max())
        probs[b] = p / p.sum()
        chosen = np.zeros(n_experts, dtype=np.bool_)  # the top_k experts, the first of equals first
        total = np.float32(0.0)
        for _ in range(top_k):
            best = -1
            for e in range(n_experts):
                if not chosen[e] and (best < 0 or probs[b, e] > probs[b, best]):
                    best = e
            chosen[best] = True
            counts[best] += 1.0
            total += probs[b, best]
        for e in range(n_experts):  # in expert order, as the module adds them
            if chosen[e]:
                weight = probs[b, e] / total if normalize else probs[b, e]
                swiglu_rows(x[b:b + 1], W_gate[e], W_up[e], W_down[e], y)
                for r in range(out.shape[1]):
                    out[b, r] += weight * y[0, r]
    # n_experts * sum_e (slots of e / all slots) * (mean probability of e)
    aux = 0.0
    for e in range(n_experts):
        aux += counts[e] / (batch * top_k) * probs[:, e].astype(np.float64).sum() / batch
    return out, n_experts * aux

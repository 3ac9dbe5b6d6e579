"""The model-level ends of a decode step: the embedding rows of the tokens, and the final norm with the LM head."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hybridlm.ops.gemm.numba_ops import row_dot
from hybridlm.ops.step.block import block_input


@njit(cache=True, inline="always", fastmath={"contract", "arcp", "nsz", "reassoc"})
def norm_linear_rows(norm_w, eps, W, hidden):  # pragma: no cover - compiled
    # hidden: (b, i)  norm_w: (i,)  W: (o, i) -> (b, o) = rmsnorm(hidden) * norm_w @ W.T: a final norm and an LM
    # head (a decode step's logits); its loop runs in parallel in the parallel kernels that inline this
    x = block_input(hidden, True, norm_w, eps)
    out = np.empty((x.shape[0], W.shape[0]), dtype=np.float32)
    for r in prange(W.shape[0]):
        for b in range(x.shape[0]):
            out[b, r] = row_dot(W, r, x, b)
    return out


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz", "reassoc"})
def norm_linear(norm_w, eps, W, hidden):  # pragma: no cover - compiled
    # hidden: (b, i) -> (b, o): norm_linear_rows in one call
    return norm_linear_rows(norm_w, eps, W, hidden)


@njit(cache=True, inline="always")
def embedding_rows(embedding, ids):  # pragma: no cover - compiled
    # embedding: (vocab, d)  ids: (b,) -> (b, d), the rows of the tokens (ids checked by the caller)
    hidden = np.empty((ids.shape[0], embedding.shape[1]), dtype=embedding.dtype)
    for b in range(ids.shape[0]):
        hidden[b] = embedding[ids[b]]
    return hidden

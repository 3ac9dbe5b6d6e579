"""Feature maps φ of linear attention: φ(q)ᵀφ(k) stands in for softmax's exp(qᵀk/√d).

- ``elu1``: elu(x) + 1 (Katharopoulos et al. 2020), positive.
- ``performer``: FAVOR+ positive random features (Choromanski et al. 2021), φ(x) = exp(Wx' − ‖x'‖²/2)/√m with
  x' = x·d^(-1/4) and W (m, d) block-orthogonal Gaussian rows: E[φ(q)ᵀφ(k)] = exp(qᵀk/√d), an unbiased estimate
  of softmax's kernel.
- ``taylor``: Based's second-order Taylor expansion of exp (Arora et al. 2024), φ(x) = [1, x', x'⊗x'/√2] with
  x' = x·d^(-1/4), so φ(q)ᵀφ(k) = 1 + s + s²/2 with s = qᵀk/√d; 1 + d + d² features.
- ``identity``: φ(x) = x·d^(-1/2) on queries (GLA's and RetNet's scaled dot product), x on keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu1", "performer", "taylor", "identity")
# Added to the normaliser φ(q)ᵀΣφ(k): keeps it away from 0 before any key has arrived (a fully padded prefix)
NORMALIZER_EPS = 1e-6


def feature_dim(kind: str, key_dim: int, n_features: int) -> int:
    """Features per head that map ``kind`` makes of ``key_dim`` inputs (``n_features``: the Performer's m)."""
    return {"elu1": key_dim, "identity": key_dim, "performer": n_features, "taylor": 1 + key_dim + key_dim ** 2}[kind]


def orthogonal_features(n_features: int, key_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """FAVOR+'s projection (m, d): blocks of d orthonormal rows (QR of a Gaussian matrix), each row rescaled to the
    norm of a d-dimensional Gaussian vector, so every row is marginally N(0, I) and rows within a block orthogonal."""
    blocks = []
    for _ in range(math.ceil(n_features / key_dim)):
        q, _ = torch.linalg.qr(torch.randn(key_dim, key_dim, generator=generator, dtype=torch.float64))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, key_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).float()


def feature_map(x: torch.Tensor, kind: str, projection: torch.Tensor | None = None, query: bool = False
                ) -> torch.Tensor:
    # x: (..., d) -> (..., feature_dim(kind, d, m));  projection: (m, d), the Performer's W
    d = x.shape[-1]
    if kind == "elu1":
        return F.elu(x) + 1
    if kind == "identity":
        return x * d ** -0.5 if query else x
    x = x * d ** -0.25
    if kind == "performer":
        m = projection.shape[0]
        return torch.exp(x @ projection.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2) * m ** -0.5
    if kind == "taylor":
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) * 2 ** -0.5
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)
    raise ValueError(f"kind: expected one of {FEATURE_MAPS}, got {kind!r}")

"""The Moore–Penrose pseudo-inverse of small (m × m) matrices, exactly or by Nyströmformer's iteration."""

from __future__ import annotations

import torch


def pseudo_inverse(a: torch.Tensor, iterations: int | None = 6) -> torch.Tensor:
    # a: (..., m, m) -> (..., m, m). iterations None: torch.linalg.pinv (exact, SVD). Otherwise the iteration of
    # Nyströmformer (Xiong et al. 2021, eq. 13, after Razavi et al. 2014): Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))), from
    # Z₀ = Aᵀ / (max column sum · max row sum) of |A|; 6 iterations in the paper.
    if iterations is None:
        return torch.linalg.pinv(a)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"pinv_iterations: expected a positive integer or None (exact), got {iterations!r}")
    magnitude = a.abs()
    scale = magnitude.sum(-2).amax(-1, keepdim=True) * magnitude.sum(-1).amax(-1, keepdim=True)
    z = a.transpose(-1, -2) / scale[..., None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z

"""Skyformer (Chen et al. 2021): attention with the Gaussian kernel κ(q, k) = exp(−|q − k|² / 2) on q and k scaled by
d^(−1/4), in place of softmax's normalised exp(q·k / √d), approximated by the Nyström method.

The kernel matrix of queries against keys is not symmetric, but it is a block of the kernel matrix of all 2l points
[Q; K], which is positive semi-definite; Nyström on that matrix with m landmarks S sampled among the 2l points gives
κ(Q, K) ≈ κ(Q, S) (κ(S, S) + λI)⁻¹ κ(S, K). Skyformer's code adds λ = 0.1 and rescales κ(S, S) symmetrically by its row
sums before the iterative inverse (which converges better so); its rows are not normalised (κ <= 1). O(l · m).
Bidirectional (see the package docstring)."""

from __future__ import annotations

import torch

from hybridlm.ops.low_rank_attention.pinv import pseudo_inverse

REGULARIZATION = 0.1  # λ of Skyformer's code


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # x: (..., n, d)  y: (..., m, d), already scaled -> (..., n, m): exp(x·y − |x|²/2 − |y|²/2) = exp(−|x − y|²/2)
    return torch.exp(x @ y.transpose(-1, -2) - (x * x).sum(-1, keepdim=True) / 2 - (y * y).sum(-1)[..., None, :] / 2)


def gaussian_kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q, k: (b, h, l, d)  v: (b, h, l, e) -> (b, h, l, e): κ(Q, K) V exactly, the target Skyformer approximates
    scale = q.shape[-1] ** -0.25
    return gaussian_kernel(q * scale, k * scale) @ v


def landmark_indices(length: int, n_landmarks: int, seed: int = 0, device: torch.device | None = None
                     ) -> torch.Tensor:
    """Which of the 2l points [Q; K] are landmarks: ⌈m/2⌉ queries and ⌊m/2⌋ keys, uniformly without replacement (as
    Skyformer's code samples half from each); (m,) indices into [0, 2l)."""
    if not isinstance(n_landmarks, int) or not 1 <= n_landmarks <= 2 * length:
        raise ValueError(f"n_landmarks: expected an integer from 1 to twice the sequence length (Skyformer's landmarks "
                         f"are queries and keys), 2 * {length} = {2 * length}, got {n_landmarks!r}")
    from_queries = min(length, -(-n_landmarks // 2))
    from_keys = n_landmarks - from_queries
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randperm(length, generator=generator)[:from_queries]
    keys = torch.randperm(length, generator=generator)[:from_keys] + length
    return torch.cat([queries, keys]).to(device)


def _factors(q: torch.Tensor, k: torch.Tensor, n_landmarks: int, pinv_iterations: int | None,
             regularization: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q, k: (b, h, l, d) -> κ(Q, S) (b, h, l, m), (κ(S, S) + λI)⁻¹ (b, h, m, m), κ(S, K) (b, h, m, l)
    scale = q.shape[-1] ** -0.25
    q, k = q * scale, k * scale
    landmarks = torch.cat([q, k], 2)[:, :, landmark_indices(q.shape[2], n_landmarks, seed, q.device)]
    inner = gaussian_kernel(landmarks, landmarks)
    inner = inner + regularization * torch.eye(inner.shape[-1], dtype=inner.dtype, device=inner.device)
    if pinv_iterations is None:
        inverse = pseudo_inverse(inner, None)
    else:  # D^(-1/2) (D^(-1/2) K D^(-1/2))⁻¹ D^(-1/2) = K⁻¹, the rescaled matrix being better conditioned
        d = inner.sum(-1).rsqrt()
        inverse = d[..., :, None] * pseudo_inverse(d[..., :, None] * inner * d[..., None, :], pinv_iterations) \
            * d[..., None, :]
    return gaussian_kernel(q, landmarks), inverse, gaussian_kernel(landmarks, k)


def skyformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_landmarks: int,
                        pinv_iterations: int | None = 6, regularization: float = REGULARIZATION, seed: int = 0
                        ) -> torch.Tensor:
    # q, k: (b, h, l, d)  v: (b, h, l, e) -> (b, h, l, e). With every point a landmark (n_landmarks = 2l), λ = 0 and
    # the exact inverse, it is gaussian_kernel_attention itself.
    left, inverse, right = _factors(q, k, n_landmarks, pinv_iterations, regularization, seed)
    return left @ (inverse @ (right @ v))


def skyformer_weights(q: torch.Tensor, k: torch.Tensor, n_landmarks: int, rows: torch.Tensor,
                      pinv_iterations: int | None = 6, regularization: float = REGULARIZATION, seed: int = 0
                      ) -> torch.Tensor:
    # q, k: (b, h, l, d)  rows: (n,) -> (b, h, n, l): the kernel rows the method applies to those queries
    left, inverse, right = _factors(q, k, n_landmarks, pinv_iterations, regularization, seed)
    return left[:, :, rows] @ inverse @ right

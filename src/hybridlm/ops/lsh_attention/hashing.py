"""Angular LSH (Andoni et al. 2015, as Reformer uses it): a random rotation R per round, bucket = argmax([xR; −xR])."""

from __future__ import annotations

import torch


def random_rotations(n_heads: int, n_rounds: int, head_dim: int, n_buckets: int, seed: int = 0) -> torch.Tensor:
    """Gaussian projections for ``n_rounds`` hash rounds of each head: (n_heads, n_rounds, head_dim, n_buckets // 2).
    Drawn from ``seed`` alone, so a model built twice hashes alike (a checkpoint keeps them too)."""
    if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
        raise ValueError(f"n_buckets: expected 1 or an even number >= 2 (angular LSH splits ±xR), got {n_buckets}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_heads, n_rounds, head_dim, max(1, n_buckets // 2), generator=generator)


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int) -> torch.Tensor:
    # x: (b, h, l, d)  rotations: (h, r, d, n_buckets // 2) -> buckets (b, h, r, l) int64 in [0, n_buckets)
    b, h, length, _ = x.shape
    if n_buckets == 1:
        return torch.zeros(b, h, rotations.shape[1], length, dtype=torch.long, device=x.device)
    projected = torch.einsum("bhld,hrdn->bhrln", x, rotations.to(x.dtype))
    # argmax over [xR; -xR] without forming it: the larger of max(xR) and -min(xR) (ties to the first half, as argmax)
    top, low = projected.argmax(-1), projected.argmin(-1)
    top_value, low_value = projected.gather(-1, top[..., None])[..., 0], projected.gather(-1, low[..., None])[..., 0]
    return torch.where(top_value >= -low_value, top, low + projected.shape[-1])

"""Nyströmformer's attention (Xiong et al. 2021): softmax attention through m landmarks, the means of m contiguous
segments of the queries and of the keys; O(l · m) time and memory. Bidirectional (see the package docstring)."""

from __future__ import annotations

import math

import torch

from hybridlm.ops.low_rank_attention.pinv import pseudo_inverse


def segment_means(x: torch.Tensor, n_segments: int) -> torch.Tensor:
    # x: (b, h, l, d) -> (b, h, m, d): the means of m contiguous segments, [⌊i·l/m⌋, ⌊(i+1)·l/m⌋) (sizes differ by at
    # most one where m does not divide l; the paper pads instead)
    length = x.shape[2]
    if not isinstance(n_segments, int) or not 1 <= n_segments <= length:
        raise ValueError(f"n_landmarks: expected an integer from 1 to the sequence length {length}, got {n_segments!r}")
    bounds = torch.div(torch.arange(n_segments + 1, device=x.device) * length, n_segments, rounding_mode="floor")
    sums = torch.cat([x.new_zeros(*x.shape[:2], 1, x.shape[3]), x.cumsum(2)], 2)
    return (sums[:, :, bounds[1:]] - sums[:, :, bounds[:-1]]) / (bounds[1:] - bounds[:-1])[:, None].to(x.dtype)


def _factors(q: torch.Tensor, k: torch.Tensor, n_landmarks: int, pinv_iterations: int | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q, k: (b, h, l, d) -> F (b, h, l, m), A⁺ (b, h, m, m), B (b, h, m, l): attention ≈ F A⁺ B
    scale = 1 / math.sqrt(q.shape[-1])
    q_landmarks, k_landmarks = segment_means(q, n_landmarks), segment_means(k, n_landmarks)
    f = torch.softmax(q @ k_landmarks.transpose(-1, -2) * scale, -1)
    a = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2) * scale, -1)
    b = torch.softmax(q_landmarks @ k.transpose(-1, -2) * scale, -1)
    return f, pseudo_inverse(a, pinv_iterations), b


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_landmarks: int,
                      pinv_iterations: int | None = 6) -> torch.Tensor:
    # q, k: (b, h, l, d)  v: (b, h, l, e) -> (b, h, l, e). With as many landmarks as tokens and the exact
    # pseudo-inverse it is softmax attention itself (S S⁺ S = S).
    f, a_pinv, b = _factors(q, k, n_landmarks, pinv_iterations)
    return f @ (a_pinv @ (b @ v))


def nystrom_weights(q: torch.Tensor, k: torch.Tensor, n_landmarks: int, rows: torch.Tensor,
                    pinv_iterations: int | None = 6) -> torch.Tensor:
    # q, k: (b, h, l, d)  rows: (n,) query positions -> (b, h, n, l): the attention rows the method applies to them
    f, a_pinv, b = _factors(q, k, n_landmarks, pinv_iterations)
    return f[:, :, rows] @ a_pinv @ b

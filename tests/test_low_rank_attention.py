"""Nyströmformer and Skyformer: exact with every token a landmark, error falling as landmarks grow, the iterative
pseudo-inverse, gradients, and the errors for bad landmark counts."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops.low_rank_attention.nystrom import nystrom_attention, nystrom_weights, segment_means
from hybridlm.ops.low_rank_attention.pinv import pseudo_inverse
from hybridlm.ops.low_rank_attention.skyformer import (
    gaussian_kernel,
    gaussian_kernel_attention,
    skyformer_attention,
    skyformer_weights,
)


def inputs(length=37, b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_segment_means_cover_every_token_once():
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    means = segment_means(x, 3)  # segments [0, 3), [3, 6), [6, 10)
    torch.testing.assert_close(means.flatten(), torch.tensor([1.0, 4.0, 7.5], dtype=torch.float64))
    torch.testing.assert_close(segment_means(x, 10), x)


def test_nystrom_with_every_token_a_landmark_is_softmax_attention():
    q, k, v = inputs()
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(nystrom_attention(q, k, v, 37, pinv_iterations=None), exact, atol=1e-10, rtol=0)


def test_skyformer_with_every_point_a_landmark_is_gaussian_kernel_attention():
    q, k, v = inputs()
    exact = gaussian_kernel_attention(q, k, v)
    out = skyformer_attention(q, k, v, 2 * 37, pinv_iterations=None, regularization=0.0)
    torch.testing.assert_close(out, exact, atol=1e-10, rtol=0)
    scale = 16 ** -0.25  # the kernel itself: exp(-|q - k|^2 / 2) on scaled vectors
    expected = torch.exp(-torch.cdist(q[0, 0] * scale, k[0, 0] * scale) ** 2 / 2)
    torch.testing.assert_close(gaussian_kernel(q[0, 0] * scale, k[0, 0] * scale), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["nystrom", "skyformer"])
def test_the_error_falls_as_landmarks_grow(method):
    q, k, v = inputs(length=128, b=1, d=16)
    if method == "nystrom":
        exact = F.scaled_dot_product_attention(q, k, v)
        errors = [relative_error(nystrom_attention(q, k, v, m), exact) for m in (4, 16, 64, 128)]
    else:
        exact = gaussian_kernel_attention(q, k, v)
        errors = [relative_error(skyformer_attention(q, k, v, m), exact) for m in (8, 32, 128, 256)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_the_weights_are_the_rows_the_output_applies():
    q, k, _ = inputs(length=29)
    rows = torch.tensor([0, 13, 28])
    eye = torch.eye(29, dtype=torch.float64).expand(2, 2, 29, 29)  # with V = I the output rows are the weights
    torch.testing.assert_close(nystrom_weights(q, k, 8, rows), nystrom_attention(q, k, eye, 8)[:, :, rows])
    torch.testing.assert_close(skyformer_weights(q, k, 20, rows), skyformer_attention(q, k, eye, 20)[:, :, rows])


def test_the_iterative_pseudo_inverse_converges_to_the_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 8, 8, generator=g, dtype=torch.float64) * 3, -1)
    errors = [relative_error(pseudo_inverse(a, n), torch.linalg.inv(a)) for n in (2, 6, 20)]
    assert errors[-1] < 1e-8 and errors[0] > errors[1] > errors[2], errors
    with pytest.raises(ValueError, match="pinv_iterations"):
        pseudo_inverse(a, 0)


def test_float64_gradients_match_finite_differences():
    q, k, v = (x[:1, :1, :12, :4].clone().requires_grad_(True) for x in inputs())
    assert torch.autograd.gradcheck(lambda a, b, c: nystrom_attention(a, b, c, 3), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: skyformer_attention(a, b, c, 6), (q, k, v))


def test_more_landmarks_than_allowed_are_a_clear_error():
    q, k, v = inputs(length=10)
    with pytest.raises(ValueError, match="n_landmarks: expected an integer from 1 to the sequence length 10, got 11"):
        nystrom_attention(q, k, v, 11)
    with pytest.raises(ValueError, match="n_landmarks: .*twice the sequence length.*= 20, got 21"):
        skyformer_attention(q, k, v, 21)
    with pytest.raises(ValueError, match="n_landmarks"):
        nystrom_attention(q, k, v, 0)

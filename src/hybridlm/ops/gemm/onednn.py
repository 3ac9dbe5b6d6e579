"""Many-row linear products on x86 CPUs through oneDNN's GEMM rather than torch's default BLAS.

For float32 on a CPU, ``F.linear`` calls MKL's sgemm. On the AMD EPYC this project is measured on, oneDNN's JIT GEMM,
which torch ships for its own fused CPU ops (``torch.ops.mkldnn._linear_pointwise``), does the products of a 130M
model's prefill in less time (``python benchmarks/gemm_backends.py``; docs/performance.md, "Figures behind the
kernels"). A prefill spends most of its time in these products.

``linear`` is ``F.linear`` with that GEMM where it applies (x86, float32, no autograd to record); elsewhere it is
``F.linear`` itself. The results differ from MKL's by float32 rounding (a different summation order).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F


def _probe() -> bool:
    # The op is torch's own (private) entry to oneDNN: use it only where it exists and gives F.linear's result.
    if not (platform.machine().lower() in {"x86_64", "amd64"} and torch.backends.mkldnn.is_available()):
        return False  # measured on x86 only; elsewhere (Arm, Apple) torch's BLAS stays
    x, w, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3), torch.ones(4)
    try:
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), F.linear(x, w, b))
    except (AttributeError, RuntimeError, TypeError):
        return False


AVAILABLE = _probe()


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` takes oneDNN's GEMM for these arguments (it has no backward, so not under autograd)."""
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: (..., i)  weight: (o, i)  bias: (o,) or None -> (..., o)
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

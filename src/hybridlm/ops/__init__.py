"""Kernels behind a single dispatch point (see ``dispatch``). They take tensors or arrays and scalars, never modules.

One folder an operation, its forms side by side: ``reference.py`` (a slow, obviously correct loop: the tests'
oracle), ``torch_ops.py`` (plain torch: any device, autograd), ``numba_ops.py`` (compiled CPU kernels),
``cuda_ops.py`` (the official CUDA kernels, when installed); a form with its own algorithm is named for it
(``ssd/chunked.py``). ``step/`` holds the compiled decode-step kernels, whose torch forms are the modules' own
``step`` methods.

Public ops (shapes in each backend's docstring):
    selective_scan   Mamba-1 scan           backends: mamba_ssm (CUDA, when installed), numba (CPU), reference
    ssd              Mamba-2 SSD            backends: numba (CPU inference), chunked (torch matmuls), reference
    causal_conv1d    depthwise causal conv  backends: numba (CPU inference), torch
    causal_conv1d_step                      backends: torch
    linear           x @ W.T (+ b)          backends: gemv (numba matrix-vector product for decode rows; oneDNN's
                                            GEMM for more rows on x86, see gemm/onednn), torch
    linears          x @ W_m.T (+ b_m) for several W_m in one pass    backends: gemv, torch
    rms_norm         w * x / sqrt(mean(x^2) + eps) over the last dim   backends: numba (decode rows), torch
    gated_rms_norm   Mamba-2's w * rmsnorm(y * silu(z)) by group       backends: numba (CPU inference), torch
    gated_mlp        SwiGLU: (silu(x W_gate^T) * x W_up^T) W_down^T   backends: gemv (fused for decode rows;
                                                                       oneDNN's GEMMs for more), torch
    decode_attention one query per sequence over a KV cache            backends: numba (CPU), torch (SDPA)
    linear_attention decayed linear attention over a sequence          backends: chunked (torch matmuls),
                                                                       quadratic (the O(l²) form), reference
    lsh_attention    Reformer's shared-QK LSH attention over a sequence backends: sorted_chunks (torch), reference
    lsh_decode_attention  one query over its buckets' recent keys     backends: torch

Outside the dispatch, called directly: ``low_rank_attention/`` (Nyströmformer and Skyformer, bidirectional attention
functions no mixer uses; ``hybridlm bench --attention`` measures them).

Decode-step ops (``step_kernel(op)``: the compiled kernel, or None where the module's torch step runs):
    mamba_step, mamba2_step, attention_step,  a block's step: norm, mixer and residual in one call
    linear_attention_step
    mlp_step, moe_step                        a block's feed-forward half (SwiGLU, MoE) in one call
    fused_decode     the whole model's step as bound kernel calls (see ``hybridlm.decode``)
"""

from __future__ import annotations

import torch

from hybridlm.ops import dispatch
from hybridlm.ops.attention.numba_ops import decode_attention_numba
from hybridlm.ops.attention.torch_ops import decode_attention_torch
from hybridlm.ops.conv.numba_ops import causal_conv1d_numba
from hybridlm.ops.conv.torch_ops import causal_conv1d_step_torch, causal_conv1d_torch
from hybridlm.ops.gemm.numba_ops import gated_mlp as gated_mlp_gemv
from hybridlm.ops.gemm.numba_ops import linear as linear_gemv
from hybridlm.ops.gemm.numba_ops import linears as linears_gemv
from hybridlm.ops.gemm.torch_ops import gated_mlp_torch, linears_torch
from hybridlm.ops.linear_attention.chunked import linear_attention_chunked, linear_attention_quadratic
from hybridlm.ops.linear_attention.reference import linear_attention_reference
from hybridlm.ops.lsh_attention.decode import lsh_decode_attention
from hybridlm.ops.lsh_attention.reference import lsh_attention_reference
from hybridlm.ops.lsh_attention.sorted_chunks import lsh_attention_sorted
from hybridlm.ops.norm.numba_ops import gated_rms_norm_numba, rms_norm_numba
from hybridlm.ops.norm.torch_ops import gated_rms_norm_torch, rms_norm_torch
from hybridlm.ops.scan.cuda_ops import mamba_ssm_available, selective_scan_mamba_ssm
from hybridlm.ops.scan.numba_ops import selective_scan_numba
from hybridlm.ops.scan.reference import selective_scan_reference
from hybridlm.ops.ssd.chunked import ssd_chunked
from hybridlm.ops.ssd.numba_ops import ssd_numba
from hybridlm.ops.ssd.reference import ssd_reference
from hybridlm.ops.step import attention as attention_step_kernel
from hybridlm.ops.step import ffn as ffn_step_kernels
from hybridlm.ops.step import linear_attention as linear_attention_step_kernel
from hybridlm.ops.step import mamba as mamba_step_kernels

# numba is a core dependency (pyproject.toml): the CPU kernels are imported unconditionally.
_CPU = torch.device("cpu")
_on_cpu = lambda device: device.type == "cpu"  # noqa: E731

# Plain backends: any device; the oracles of the tests and the fallbacks.
dispatch.register("selective_scan", "reference", selective_scan_reference)
dispatch.register("ssd", "chunked", ssd_chunked)
dispatch.register("ssd", "reference", ssd_reference)
dispatch.register("causal_conv1d", "torch", causal_conv1d_torch)
dispatch.register("causal_conv1d_step", "torch", causal_conv1d_step_torch)
dispatch.register("linear", "torch", torch.nn.functional.linear)
dispatch.register("decode_attention", "torch", decode_attention_torch)
dispatch.register("linears", "torch", linears_torch)
dispatch.register("gated_mlp", "torch", gated_mlp_torch)
dispatch.register("rms_norm", "torch", rms_norm_torch)
dispatch.register("gated_rms_norm", "torch", gated_rms_norm_torch)
dispatch.register("linear_attention", "chunked", linear_attention_chunked)
dispatch.register("linear_attention", "quadratic", linear_attention_quadratic)
dispatch.register("linear_attention", "reference", linear_attention_reference)
dispatch.register("lsh_attention", "sorted_chunks", lsh_attention_sorted)
dispatch.register("lsh_attention", "reference", lsh_attention_reference)
dispatch.register("lsh_decode_attention", "torch", lsh_decode_attention)
for _op in ("mamba_step", "mamba2_step", "attention_step", "linear_attention_step", "mlp_step", "moe_step",
            "fused_decode"):
    dispatch.register(_op, "torch", dispatch.MODULE_STEP)

# The compiled CPU kernels, preferred on the CPU.
dispatch.register("selective_scan", "numba", selective_scan_numba, runs_on=_on_cpu, first=True)
dispatch.register("ssd", "numba", ssd_numba, runs_on=_on_cpu, first=True)
dispatch.register("causal_conv1d", "numba", causal_conv1d_numba, runs_on=_on_cpu, first=True)
dispatch.register("linear", "gemv", linear_gemv, runs_on=_on_cpu, first=True)
dispatch.register("linears", "gemv", linears_gemv, runs_on=_on_cpu, first=True)
dispatch.register("gated_mlp", "gemv", gated_mlp_gemv, runs_on=_on_cpu, first=True)
dispatch.register("decode_attention", "numba", decode_attention_numba, runs_on=_on_cpu, first=True)
dispatch.register("rms_norm", "numba", rms_norm_numba, runs_on=_on_cpu, first=True)
dispatch.register("gated_rms_norm", "numba", gated_rms_norm_numba, runs_on=_on_cpu, first=True)
dispatch.register("mamba_step", "numba", mamba_step_kernels.mamba_step, runs_on=_on_cpu, first=True)
dispatch.register("mamba2_step", "numba", mamba_step_kernels.mamba2_step, runs_on=_on_cpu, first=True)
dispatch.register("attention_step", "numba", attention_step_kernel.attention_step, runs_on=_on_cpu, first=True)
dispatch.register("linear_attention_step", "numba", linear_attention_step_kernel.linear_attention_step,
                  runs_on=_on_cpu, first=True)
dispatch.register("mlp_step", "numba", ffn_step_kernels.mlp_step, runs_on=_on_cpu, first=True)
dispatch.register("moe_step", "numba", ffn_step_kernels.moe_step, runs_on=_on_cpu, first=True)
dispatch.register("fused_decode", "numba", dispatch.FUSED, runs_on=_on_cpu, first=True)

# The official CUDA kernels, used only when installed and the tensors are on a GPU.
if mamba_ssm_available():
    dispatch.register("selective_scan", "mamba_ssm", selective_scan_mamba_ssm,
                      runs_on=lambda device: device.type == "cuda", first=True)


def selective_scan(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Mamba-1 selective scan -> (y, final_state). See ``selective_scan_reference`` for the contract."""
    return dispatch.kernel("selective_scan", x.device, backend)(x, *args, **kwargs)


def ssd(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Mamba-2 SSD -> (y, final_state). See ``ssd_reference`` for the contract."""
    return dispatch.kernel("ssd", x.device, backend)(x, *args, **kwargs)


def linear_attention(q: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Linear attention with a decay per head, per key feature or none -> (o, final_state). See
    ``linear_attention_reference`` for the contract."""
    return dispatch.kernel("linear_attention", q.device, backend)(q, *args, **kwargs)


def causal_conv1d(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Causal depthwise conv1d -> (y, final_state). See ``causal_conv1d_torch``."""
    return dispatch.kernel("causal_conv1d", x.device, backend)(x, *args, **kwargs)


def causal_conv1d_step(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """One decode step of the causal conv, updating the state in place. See ``causal_conv1d_step_torch``."""
    return dispatch.kernel("causal_conv1d_step", x.device, backend)(x, *args, **kwargs)


def lsh_attention(qk: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Reformer's shared-QK LSH attention over a sequence -> o. See ``lsh_attention_reference`` for the contract."""
    return dispatch.kernel("lsh_attention", qk.device, backend)(qk, *args, **kwargs)


def lsh_decode_attention(q: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """One LSH-attention decode step -> o (b, h, 1, e). See ``lsh_decode_attention``'s module."""
    return dispatch.kernel("lsh_decode_attention", q.device, backend)(q, *args, **kwargs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``F.linear``; on CPU a bandwidth-bound matrix-vector product when x has only a few rows (decode)."""
    return dispatch.kernel("linear", x.device, backend)(x, weight, bias)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                     key_valid: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """One query per sequence (b, h, 1, d) over the first ``length`` positions of a KV cache -> (b, h, 1, d)."""
    return dispatch.kernel("decode_attention", q.device, backend)(q, k_cache, v_cache, length, key_valid)


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              backend: str | None = None) -> torch.Tensor:
    """The SwiGLU feed-forward ``F.linear(silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)``; on CPU one
    fused pair of matrix-vector passes when x has only a few rows (decode)."""
    return dispatch.kernel("gated_mlp", x.device, backend)(x, w_gate, w_up, w_down)




def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...],
            backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w, b)`` for each pair, in one pass over the weights when decoding on CPU."""
    return dispatch.kernel("linears", x.device, backend)(x, weights, biases)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float,
                   backend: str | None = None) -> torch.Tensor:
    """Mamba-2's gated RMSNorm ``weight * rmsnorm(y * silu(z))``, statistics per group of channels; on CPU one
    compiled pass for float32 inference."""
    return dispatch.kernel("gated_rms_norm", y.device, backend)(y, z, weight, n_groups, eps)




def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension, statistics in float32 or better; on CPU one compiled call for the few
    rows of a decode step."""
    return dispatch.kernel("rms_norm", x.device, backend)(x, weight, eps)


def step_kernel(op: str) -> object | None:
    """The compiled kernel the dispatch picks for decode-step ``op`` on the CPU, or None where it picks the torch form
    (the module's own ``step``, e.g. with ``HYBRIDLM_BACKEND=mamba_step=torch``)."""
    chosen = dispatch.kernel(op, _CPU)
    return None if chosen is dispatch.MODULE_STEP else chosen


__all__ = ["causal_conv1d", "causal_conv1d_step", "decode_attention", "dispatch", "gated_mlp", "gated_rms_norm",
           "linear", "linear_attention", "linears", "rms_norm", "selective_scan", "ssd", "step_kernel"]

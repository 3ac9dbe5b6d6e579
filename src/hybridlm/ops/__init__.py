"""Hot kernels behind a single dispatch point (see ``dispatch``).

Public ops (shapes in each backend's docstring):
    selective_scan   Mamba-1 scan           backends: mamba_ssm (CUDA, when installed), numba (CPU), reference
    ssd              Mamba-2 SSD            backends: numba (CPU inference), chunked (torch matmuls), reference
    causal_conv1d    depthwise causal conv  backends: numba (CPU inference), torch
    causal_conv1d_step                      backends: torch
    mamba_step       Mamba-1 decode step    backends: numba (CPU, float32, fused), torch
    mamba2_step      Mamba-2 decode step    backends: numba (CPU, float32, fused), torch
    linear           x @ W.T (+ b)          backends: gemv (numba matrix-vector product for decode rows; oneDNN's
                                            GEMM for more rows on x86, see onednn_gemm), torch
    linears          x @ W_m.T (+ b_m) for several W_m in one pass    backends: gemv, torch
    rms_norm         w * x / sqrt(mean(x^2) + eps) over the last dim   backends: numba (decode rows), torch
    gated_rms_norm   Mamba-2's w * rmsnorm(y * silu(z)) by group       backends: numba (CPU inference), torch
    gated_mlp        SwiGLU: (silu(x W_gate^T) * x W_up^T) W_down^T   backends: gemv (fused for decode rows;
                                                                       oneDNN's GEMMs for more), torch
    decode_attention one query per sequence over a KV cache            backends: numba (CPU), torch (SDPA)
    attention_step   attention decode step (q/k/v, rotary, cache write, attention, o_proj)
                                                                       backends: numba (CPU, float32, fused), torch
    fused_decode     a model's decode step as bound kernel calls       backends: numba (CPU, float32), torch (none)
"""

from __future__ import annotations

import warnings

import torch

from hybridlm.ops import dispatch
from hybridlm.ops.attention import decode_attention_torch
from hybridlm.ops.attention_step import attention_step_torch
from hybridlm.ops.causal_conv import causal_conv1d_step_torch, causal_conv1d_torch
from hybridlm.ops.gated_rms_norm import gated_rms_norm_torch
from hybridlm.ops.mamba_step import mamba2_step_torch, mamba_step_torch
from hybridlm.ops.projections import gated_mlp_torch, linears_torch
from hybridlm.ops.rms_norm import rms_norm_torch
from hybridlm.ops.selective_scan_cuda import mamba_ssm_available, selective_scan_mamba_ssm
from hybridlm.ops.selective_scan_reference import selective_scan_reference
from hybridlm.ops.ssd_chunked import ssd_chunked
from hybridlm.ops.ssd_reference import ssd_reference

# Plain backends: any device; the oracles of the tests and the fallbacks.
dispatch.register("selective_scan", "reference", selective_scan_reference)
dispatch.register("ssd", "chunked", ssd_chunked)
dispatch.register("ssd", "reference", ssd_reference)
dispatch.register("causal_conv1d", "torch", causal_conv1d_torch)
dispatch.register("causal_conv1d_step", "torch", causal_conv1d_step_torch)
dispatch.register("mamba_step", "torch", mamba_step_torch)
dispatch.register("mamba2_step", "torch", mamba2_step_torch)
dispatch.register("linear", "torch", torch.nn.functional.linear)
dispatch.register("decode_attention", "torch", decode_attention_torch)
dispatch.register("attention_step", "torch", attention_step_torch)
dispatch.register("linears", "torch", linears_torch)
dispatch.register("gated_mlp", "torch", gated_mlp_torch)
dispatch.register("rms_norm", "torch", rms_norm_torch)
dispatch.register("gated_rms_norm", "torch", gated_rms_norm_torch)
dispatch.register("fused_decode", "torch", lambda model, state, ids: None)  # None: the blocks' modules, one by one

_on_cpu = lambda device: device.type == "cpu"  # noqa: E731
try:  # numba is a core dependency, but a broken install must not break the library
    from hybridlm.ops.attention_numba import decode_attention_numba
    from hybridlm.ops.attention_step_numba import attention_step_numba
    from hybridlm.ops.causal_conv_numba import causal_conv1d_numba
    from hybridlm.ops.fused_decode import fused_decode as fused_decode_numba
    from hybridlm.ops.gated_rms_norm import gated_rms_norm_numba
    from hybridlm.ops.gemv import gated_mlp as gated_mlp_gemv
    from hybridlm.ops.gemv import linear as linear_gemv
    from hybridlm.ops.gemv import linears as linears_gemv
    from hybridlm.ops.mamba_step_numba import mamba2_step_numba, mamba_step_numba
    from hybridlm.ops.rms_norm_numba import rms_norm_numba
    from hybridlm.ops.selective_scan_numba import selective_scan_numba
    from hybridlm.ops.ssd_numba import ssd_numba
except ImportError as e:
    warnings.warn(f"hybridlm: numba is unavailable ({e}); the Mamba-1 scan falls back to the slow reference loop "
                  f"over time and decoding to plain torch. Install numba for the fused CPU kernels.",
                  RuntimeWarning, stacklevel=2)
else:
    dispatch.register("selective_scan", "numba", selective_scan_numba, runs_on=_on_cpu, first=True)
    dispatch.register("ssd", "numba", ssd_numba, runs_on=_on_cpu, first=True)
    dispatch.register("causal_conv1d", "numba", causal_conv1d_numba, runs_on=_on_cpu, first=True)
    dispatch.register("mamba_step", "numba", mamba_step_numba, runs_on=_on_cpu, first=True)
    dispatch.register("mamba2_step", "numba", mamba2_step_numba, runs_on=_on_cpu, first=True)
    dispatch.register("linear", "gemv", linear_gemv, runs_on=_on_cpu, first=True)
    dispatch.register("linears", "gemv", linears_gemv, runs_on=_on_cpu, first=True)
    dispatch.register("gated_mlp", "gemv", gated_mlp_gemv, runs_on=_on_cpu, first=True)
    dispatch.register("decode_attention", "numba", decode_attention_numba, runs_on=_on_cpu, first=True)
    dispatch.register("attention_step", "numba", attention_step_numba, runs_on=_on_cpu, first=True)
    dispatch.register("rms_norm", "numba", rms_norm_numba, runs_on=_on_cpu, first=True)
    dispatch.register("fused_decode", "numba", fused_decode_numba, runs_on=_on_cpu, first=True)
    dispatch.register("gated_rms_norm", "numba", gated_rms_norm_numba, runs_on=_on_cpu, first=True)

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


def causal_conv1d(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Causal depthwise conv1d -> (y, final_state). See ``causal_conv1d_torch``."""
    return dispatch.kernel("causal_conv1d", x.device, backend)(x, *args, **kwargs)


def causal_conv1d_step(x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """One decode step of the causal conv, updating the state in place. See ``causal_conv1d_step_torch``."""
    return dispatch.kernel("causal_conv1d_step", x.device, backend)(x, *args, **kwargs)


def mamba_step(x: torch.Tensor, mixer, state, norm=None, backend: str | None = None) -> torch.Tensor:
    """One Mamba-1 decode step, (b, d_model) -> (b, d_model), updating ``state`` in place; with ``norm`` (the
    block's RMSNorm) the block's residual update ``x + mixer(norm(x))``."""
    return dispatch.kernel("mamba_step", x.device, backend)(x, mixer, state, norm)


def mamba2_step(x: torch.Tensor, mixer, state, norm=None, backend: str | None = None) -> torch.Tensor:
    """One Mamba-2 decode step, (b, d_model) -> (b, d_model), updating ``state`` in place; with ``norm`` (the
    block's RMSNorm) the block's residual update ``x + mixer(norm(x))``."""
    return dispatch.kernel("mamba2_step", x.device, backend)(x, mixer, state, norm)


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


def attention_step(x: torch.Tensor, mixer, state, norm=None, backend: str | None = None) -> torch.Tensor:
    """One attention decode step, (b, d_model) -> (b, d_model), appending to the KV cache ``state`` in place;
    with ``norm`` (the block's RMSNorm) the block's residual update ``x + mixer(norm(x))``."""
    return dispatch.kernel("attention_step", x.device, backend)(x, mixer, state, norm)


def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...],
            backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w, b)`` for each pair, in one pass over the weights when decoding on CPU."""
    return dispatch.kernel("linears", x.device, backend)(x, weights, biases)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, n_groups: int, eps: float,
                   backend: str | None = None) -> torch.Tensor:
    """Mamba-2's gated RMSNorm ``weight * rmsnorm(y * silu(z))``, statistics per group of channels; on CPU one
    compiled pass for float32 inference."""
    return dispatch.kernel("gated_rms_norm", y.device, backend)(y, z, weight, n_groups, eps)


def fused_decode(model, state, input_ids: torch.Tensor, backend: str | None = None):
    """The bound decode kernels of ``model`` with ``state`` for one token a sequence, ``input_ids`` (b, 1): a
    callable ``input_ids -> (logits (b, 1, vocab), MoE aux loss or None)``, or None where none apply (the model
    then runs its modules). See ``fused_decode.FusedDecode``."""
    return dispatch.kernel("fused_decode", input_ids.device, backend)(model, state, input_ids)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension, statistics in float32 or better; on CPU one compiled call for the few
    rows of a decode step."""
    return dispatch.kernel("rms_norm", x.device, backend)(x, weight, eps)


__all__ = ["attention_step", "causal_conv1d", "causal_conv1d_step", "decode_attention", "dispatch", "fused_decode",
           "gated_mlp", "gated_rms_norm",
           "linear", "linears", "mamba2_step", "mamba_step", "rms_norm", "selective_scan", "ssd"]

"""Causal depthwise conv1d for CPU inference: one pass over the input, SiLU fused.

Work is split over blocks of time steps; each step reads its k input rows and writes its output row, every loop
running over all channels, which are contiguous. Splitting over channel blocks instead (each task walking the whole
sequence on a narrow strip of channels) was several times slower, as the strip loops were too short to vectorise well
and every step touched a new row of the input (docs/performance.md, "Figures behind the kernels").
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from hybridlm.ops.conv.torch_ops import causal_conv1d_torch
from hybridlm.ops.fast_math import vexp

_STEPS = 32  # time steps per task


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz"})
def _conv_fwd(x, w_t, bias, history, y, silu):  # pragma: no cover - compiled
    # x, y: (b, l, c)  w_t: (k, c)  bias: (c,)  history: (b, k - 1, c), the inputs just before x
    batch, length, channels = x.shape
    k = w_t.shape[0]
    n_blocks = (length + _STEPS - 1) // _STEPS
    one = np.float32(1.0)
    for task in prange(batch * n_blocks):
        b = task // n_blocks
        t0 = (task % n_blocks) * _STEPS
        for t in range(t0, min(t0 + _STEPS, length)):
            out = y[b, t]
            for c in range(channels):
                out[c] = bias[c]
            for j in range(k):
                src = t - (k - 1) + j
                row = x[b, src] if src >= 0 else history[b, src + k - 1]
                w = w_t[j]
                for c in range(channels):
                    out[c] += w[c] * row[c]
            if silu:
                for c in range(channels):
                    v = out[c]
                    out[c] = v / (one + vexp(-v))


def causal_conv1d_numba(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (b, l, c)  weight: (c, k)  bias: (c,)  initial_state: (b, c, k) -> y: (b, l, c), final_state: (b, c, k)
    # Inference only (float32, CPU, no autograd); otherwise the torch version.
    batch, length, channels = x.shape
    k = weight.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or length == 0
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, weight, bias, initial_state)))):
        return causal_conv1d_torch(x, weight, bias, initial_state, silu)
    x = x.detach().contiguous()
    history = (x.new_zeros(batch, k - 1, channels) if initial_state is None
               else initial_state[..., 1:].detach().to(torch.float32).transpose(1, 2).contiguous())
    b = x.new_zeros(channels) if bias is None else bias.detach().to(torch.float32).contiguous()
    y = torch.empty_like(x)
    _conv_fwd(x.numpy(), weight.detach().t().contiguous().numpy(), b.numpy(), history.numpy(), y.numpy(), silu)
    # The state is the last k inputs, reaching back into the history when the sequence is shorter than k.
    final_state = torch.cat([history, x], dim=1)[:, -k:] if length < k else x[:, -k:]
    return y, final_state.transpose(1, 2).contiguous()

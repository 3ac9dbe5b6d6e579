"""One decode step of a Mamba-1 / Mamba-2 mixer: (b, d_model) in, (b, d_model) out, states updated in place.

Given the block's pre-norm (``norm``), a step is the block's whole residual update, ``x + mixer(norm(x))``: the
fused kernels then make it one call, with no norm or add between two kernels.

``mamba_step_torch`` / ``mamba2_step_torch`` are the plain versions (any device and dtype);
``mamba_step_numba`` has the fused CPU kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hybridlm.layers.mamba import Mamba, MambaState
    from hybridlm.layers.mamba2 import Mamba2, Mamba2State
    from hybridlm.layers.norm import RMSNorm


def mamba_step_torch(x: torch.Tensor, mixer: Mamba, state: MambaState, norm: RMSNorm | None = None
                     ) -> torch.Tensor:
    # x: (b, d_model) -> (b, d_model); O(1) work in the context length, state updated in place.
    from hybridlm import ops

    if norm is not None:
        return x + mamba_step_torch(norm(x), mixer, state)

    xs, z = mixer.in_proj(x).chunk(2, dim=-1)
    xs = ops.causal_conv1d_step(xs, state.conv, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)
    dt, B, C = mixer._dt_B_C(xs)
    dt = F.softplus(dt.float() + mixer.dt_proj.bias.float())  # (b, d_inner)
    A = -torch.exp(mixer.A_log.float())
    xs32 = xs.float()
    state.ssm.mul_(torch.exp(dt[..., None] * A)).add_((dt * xs32)[..., None] * B.float()[:, None, :])
    y = (state.ssm @ C.float()[..., None])[..., 0] + mixer.D.float() * xs32
    y = y * F.silu(z.float())
    return mixer.out_proj(y.to(x.dtype))


def mamba2_step_torch(x: torch.Tensor, mixer: Mamba2, state: Mamba2State, norm: RMSNorm | None = None
                      ) -> torch.Tensor:
    # x: (b, d_model) -> (b, d_model); O(1) work in the context length, state updated in place.
    from hybridlm import ops

    if norm is not None:
        return x + mamba2_step_torch(norm(x), mixer, state)

    m = mixer
    z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, m.n_heads], dim=-1)
    xBC = ops.causal_conv1d_step(xBC, state.conv, m.conv1d.weight[:, 0], m.conv1d.bias)
    xs, B, C = xBC.float().split([m.d_inner, m.n_groups * m.d_state, m.n_groups * m.d_state], dim=-1)
    b, r = x.shape[0], m.n_heads // m.n_groups
    xs = xs.view(b, m.n_heads, m.headdim)
    B = B.view(b, m.n_groups, 1, m.d_state).expand(-1, -1, r, -1).reshape(b, m.n_heads, m.d_state)
    C = C.view(b, m.n_groups, 1, m.d_state).expand(-1, -1, r, -1).reshape(b, m.n_heads, m.d_state)
    dt = F.softplus(dt.float() + m.dt_bias.float())  # (b, h)
    decay = torch.exp(dt * -torch.exp(m.A_log.float()))
    state.ssm.mul_(decay[..., None, None]).add_((dt[..., None] * xs)[..., None] * B[:, :, None, :])
    y = (state.ssm @ C[..., None])[..., 0] + m.D.float()[:, None] * xs  # (b, h, p)
    return m.out_proj(m.norm(y.reshape(b, m.d_inner).to(x.dtype), z))

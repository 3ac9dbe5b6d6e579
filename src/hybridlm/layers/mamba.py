"""Mamba-1 mixer: input-dependent (selective) SSM, with mamba_ssm's parameter names and shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hybridlm import ops
from hybridlm.layers.linear import Linear
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.ssm_init import dt_bias_init

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


@dataclass
class MambaState:
    """Fixed-size state of one Mamba layer, whatever the context length."""

    conv: torch.Tensor  # (b, d_inner, d_conv): the last d_conv inputs of the causal conv
    ssm: torch.Tensor  # (b, d_inner, d_state), float32

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def select(self, rows: torch.Tensor, capacity: int = 0) -> MambaState:
        """A new state holding only sequences ``rows`` of this one (``capacity`` is for KV caches)."""
        return MambaState(self.conv[rows], self.ssm[rows])

    @staticmethod
    def cat(states: list[MambaState], capacity: int = 0) -> MambaState:
        """The states' sequences stacked into one batch."""
        return MambaState(torch.cat([s.conv for s in states]), torch.cat([s.ssm for s in states]))


class Mamba(nn.Module):
    """in_proj -> causal conv -> SiLU -> selective scan (gated by SiLU(z)) -> out_proj."""

    kind = "mamba"

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        d_model, d_inner, n = config.d_model, config.d_inner, config.d_state
        self.d_inner, self.d_state, self.dt_rank = d_inner, n, config.dt_rank
        self.in_proj = Linear(d_model, 2 * d_inner, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1,
                                bias=config.conv_bias)
        self.x_proj = Linear(d_inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = Linear(self.dt_rank, d_inner, bias=True)
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = Linear(d_inner, d_model, bias=config.proj_bias)
        if config.mamba_inner_norms:
            self.dt_layernorm = RMSNorm(self.dt_rank, config.norm_eps)
            self.b_layernorm = RMSNorm(n, config.norm_eps)
            self.c_layernorm = RMSNorm(n, config.norm_eps)
        self.inner_norms = config.mamba_inner_norms
        self._dt_init = (config.dt_min, config.dt_max, config.dt_init_floor)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """The published dt initialisation; the model calls it again after its generic weight init."""
        with torch.no_grad():
            bound = self.dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, *self._dt_init))

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> MambaState:
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (..., d_inner) -> dt (before bias/softplus): (..., d_inner), B, C: (..., d_state)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return ops.linear(dt, self.dt_proj.weight), B, C

    def forward(self, x: torch.Tensor, state: MambaState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool (False at padding) -> (b, l, d_model)
        if state is not None and x.shape[1] == 1 and mask is None:
            return self.step(x, state)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        keep = None if mask is None else mask[..., None].to(xs.dtype)
        # Padding must not touch the state: zero it before the conv (so the conv sees what an empty
        # history would give) and after it (so the conv bias cannot leak into the scan).
        if keep is not None:
            xs = xs * keep
        xs, conv_state = ops.causal_conv1d(xs, self.conv1d.weight[:, 0], self.conv1d.bias,
                                           None if state is None else state.conv)
        if keep is not None:
            xs = xs * keep
        dt, B, C = self._dt_B_C(xs)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ops.selective_scan(xs, dt, A, B, C, self.D.float(), z, dt_bias=self.dt_proj.bias.float(),
                                          dt_softplus=True, initial_state=None if state is None else state.ssm)
        if state is not None:
            state.conv.copy_(conv_state)
            state.ssm.copy_(ssm_state)
        return self.out_proj(y)

    def step(self, x: torch.Tensor, state: MambaState, norm: RMSNorm | None = None) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model); O(1) work in the context length, state updated in place. With
        # ``norm`` (the block's pre-norm): x + self(norm(x)), the block's residual update in one kernel call.
        # The step lives in ops (mamba_step_torch: plain torch; on CPU a fused numba kernel).
        return ops.mamba_step(x[:, 0], self, state, norm)[:, None]

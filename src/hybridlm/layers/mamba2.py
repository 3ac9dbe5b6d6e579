"""Mamba-2 mixer (SSD): scalar decay per head, B/C shared by head groups, with mamba_ssm's parameter names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hybridlm import ops
from hybridlm.layers.linear import Linear
from hybridlm.layers.norm import GatedRMSNorm, RMSNorm
from hybridlm.layers.ssm_init import dt_bias_init

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


@dataclass
class Mamba2State:
    conv: torch.Tensor  # (b, d_inner + 2 * ngroups * d_state, d_conv)
    ssm: torch.Tensor  # (b, n_heads, headdim, d_state), float32

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def select(self, rows: torch.Tensor, capacity: int = 0) -> Mamba2State:
        """A new state holding only sequences ``rows`` of this one (``capacity`` is for KV caches)."""
        return Mamba2State(self.conv[rows], self.ssm[rows])

    @staticmethod
    def cat(states: list[Mamba2State], capacity: int = 0) -> Mamba2State:
        """The states' sequences stacked into one batch."""
        return Mamba2State(torch.cat([s.conv for s in states]), torch.cat([s.ssm for s in states]))


class Mamba2(nn.Module):
    """in_proj -> [z | x B C | dt]; causal conv + SiLU on xBC; SSD; gated RMSNorm with z; out_proj."""

    kind = "mamba2"

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        d_model, d_inner = config.d_model, config.d_inner
        self.d_inner, self.d_state, self.n_groups = d_inner, config.mamba2_d_state, config.mamba2_ngroups
        self.headdim = config.mamba2_headdim
        self.n_heads = d_inner // self.headdim
        self.chunk_size = config.mamba2_chunk_size
        self.conv_dim = d_inner + 2 * self.n_groups * self.d_state
        # in_proj output order is [z, x, B, C, dt], as in mamba_ssm.
        self.in_proj = Linear(d_model, d_inner + self.conv_dim + self.n_heads, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        # A = -uniform(1, 16) per head (mamba_ssm's A_init_range), stored as log(-A).
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(d_inner, self.n_groups, config.norm_eps)
        self.out_proj = Linear(d_inner, d_model, bias=config.proj_bias)
        self._dt_init = (config.dt_min, config.dt_max, config.dt_init_floor)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        with torch.no_grad():
            self.dt_bias.copy_(dt_bias_init(self.n_heads, *self._dt_init))
            self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> Mamba2State:
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_heads, self.headdim, self.d_state, device=device,
                            dtype=torch.float32),
        )

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool (False at padding) -> (b, l, d_model)
        if state is not None and x.shape[1] == 1 and mask is None:
            return self.step(x, state)
        b, length, _ = x.shape
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        keep = None if mask is None else mask[..., None].to(xBC.dtype)
        if keep is not None:  # padding must not reach the state (see Mamba.forward)
            xBC = xBC * keep
        xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias,
                                            None if state is None else state.conv)
        if keep is not None:
            xBC = xBC * keep
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        y, ssm_state = ops.ssd(
            xs.view(b, length, self.n_heads, self.headdim), dt, -torch.exp(self.A_log.float()),
            B.view(b, length, self.n_groups, self.d_state), C.view(b, length, self.n_groups, self.d_state),
            self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
            initial_state=None if state is None else state.ssm, chunk_size=self.chunk_size,
        )
        if state is not None:
            state.conv.copy_(conv_state)
            state.ssm.copy_(ssm_state)
        return self.out_proj(self.norm(y.reshape(b, length, self.d_inner), z))

    def step(self, x: torch.Tensor, state: Mamba2State, norm: RMSNorm | None = None) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model); O(1) work in the context length, state updated in place. With
        # ``norm`` (the block's pre-norm): x + self(norm(x)), the block's residual update in one kernel call.
        # The step lives in ops (mamba2_step_torch: plain torch; on CPU a fused numba kernel).
        return ops.mamba2_step(x[:, 0], self, state, norm)[:, None]



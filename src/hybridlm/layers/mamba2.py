"""Mamba-2 mixer (SSD): scalar decay per head, B/C shared by head groups, with mamba_ssm's parameter names."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import invalid
from hybridlm.layers.linear import Linear
from hybridlm.layers.norm import GatedRMSNorm
from hybridlm.layers.ssm import FusedSSMStep, SSMState, dt_bias_init
from hybridlm.ops.step.block import EMPTY
from hybridlm.ops.step.mamba import Mamba2Layer, mamba2_stack

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


class Mamba2(FusedSSMStep, nn.Module):
    """in_proj -> [z | x B C | dt]; causal conv + SiLU on xBC; SSD; gated RMSNorm with z; out_proj."""

    kind = "mamba2"
    label = "Mamba-2"
    # The config fields that decide what it computes (interop checks a stored config against them)
    semantic_fields = ("mamba2_d_state", "mamba2_headdim", "mamba2_ngroups", "d_conv", "expand", "conv_bias",
                       "proj_bias")
    step_op = "mamba2_step"
    stack_kernel = mamba2_stack
    layer_type = Mamba2Layer

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

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        if config.d_inner % config.mamba2_headdim:
            raise invalid("mamba2_headdim", f"a divisor of expand*d_model={config.d_inner}", config.mamba2_headdim)
        n_heads = config.d_inner // config.mamba2_headdim
        if n_heads % config.mamba2_ngroups:
            raise invalid("mamba2_ngroups", f"a divisor of the Mamba-2 head count {n_heads}", config.mamba2_ngroups)

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token beyond the projections: SSD's within-chunk decay matrix (q exps a step and head)
        and its chunk-local matmuls."""
        q = min(self.chunk_size, length)
        return 2.0 * 2 * q * (self.d_inner + self.d_state * self.n_groups), float(self.n_heads * q)

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> SSMState:
        dtype = dtype or self.in_proj.weight.dtype
        return SSMState(
            conv=torch.zeros(batch_size, self.conv_dim, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_heads, self.headdim, self.d_state, device=device,
                            dtype=torch.float32),
        )

    def forward(self, x: torch.Tensor, state: SSMState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool (False at padding) -> (b, l, d_model)
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

    def step(self, x: torch.Tensor, state: SSMState) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model); one decode step in torch ops, O(1) in the context length, the state
        # updated in place (the fused CPU kernel is ``bind_step``'s)
        x = x[:, 0]
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC = ops.causal_conv1d_step(xBC, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias)
        xs, B, C = xBC.float().split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        b, r = x.shape[0], self.n_heads // self.n_groups
        xs = xs.view(b, self.n_heads, self.headdim)
        B = B.view(b, self.n_groups, 1, self.d_state).expand(-1, -1, r, -1).reshape(b, self.n_heads, self.d_state)
        C = C.view(b, self.n_groups, 1, self.d_state).expand(-1, -1, r, -1).reshape(b, self.n_heads, self.d_state)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, h)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))
        state.ssm.mul_(decay[..., None, None]).add_((dt[..., None] * xs)[..., None] * B[:, :, None, :])
        y = (state.ssm @ C[..., None])[..., 0] + self.D.float()[:, None] * xs  # (b, h, p)
        return self.out_proj(self.norm(y.reshape(b, self.d_inner).to(x.dtype), z))[:, None]

    def kernel_weights(self, w: dict[str, np.ndarray]) -> dict:
        """``Mamba2Layer``'s fields from ``W_in`` on, from this mixer's parameters (their numpy views ``w``)."""
        return dict(
            W_in=w["in_proj.weight"], b_in=w.get("in_proj.bias", EMPTY), conv_w=w["conv1d.weight"][:, 0],
            conv_b=w.get("conv1d.bias", EMPTY), dt_bias=w["dt_bias"], A_log=w["A_log"], D=w["D"],
            norm_w=w["norm.weight"], eps=np.float32(self.norm.eps), W_out=w["out_proj.weight"],
            b_out=w.get("out_proj.bias", EMPTY),
            flags=np.array(["in_proj.bias" in w, "conv1d.bias" in w, "out_proj.bias" in w]))

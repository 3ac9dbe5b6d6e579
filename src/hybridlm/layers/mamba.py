"""Mamba-1 mixer: input-dependent (selective) SSM, with mamba_ssm's parameter names and shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.layers.linear import Linear, product_without_bias
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.ssm import FusedSSMStep, SSMState, dt_bias_init
from hybridlm.ops.step.block import EMPTY
from hybridlm.ops.step.mamba import MambaLayer, mamba_stack

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig


class Mamba(FusedSSMStep, nn.Module):
    """in_proj -> causal conv -> SiLU -> selective scan (gated by SiLU(z)) -> out_proj."""

    kind = "mamba"
    label = "Mamba-1"
    # The config fields that decide what it computes (interop checks a stored config against them)
    semantic_fields = ("d_state", "dt_rank", "mamba_inner_norms", "d_conv", "expand", "conv_bias", "proj_bias")
    step_op = "mamba_step"
    stack_kernel = mamba_stack
    layer_type = MambaLayer

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

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        """Every field it reads is checked by ModelConfig itself (positive sizes, dt_min <= dt_max)."""

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token beyond the projections: the scan's exp(dt A), one per channel and state entry."""
        return 0.0, float(self.d_inner * self.d_state)

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> SSMState:
        dtype = dtype or self.in_proj.weight.dtype
        return SSMState(
            conv=torch.zeros(batch_size, self.d_inner, self.conv1d.kernel_size[0], device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _dt_B_C(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (..., d_inner) -> dt (before bias/softplus): (..., d_inner), B, C: (..., d_state)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return product_without_bias(dt, self.dt_proj), B, C

    def forward(self, x: torch.Tensor, state: SSMState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool (False at padding) -> (b, l, d_model)
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

    def step(self, x: torch.Tensor, state: SSMState) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model); one decode step in torch ops, O(1) in the context length, the state
        # updated in place (the fused CPU kernel is ``bind_step``'s)
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)
        xs = ops.causal_conv1d_step(xs, state.conv, self.conv1d.weight[:, 0], self.conv1d.bias)
        dt, B, C = self._dt_B_C(xs)
        dt = F.softplus(dt.float() + self.dt_proj.bias.float())  # (b, d_inner)
        A = -torch.exp(self.A_log.float())
        xs32 = xs.float()
        state.ssm.mul_(torch.exp(dt[..., None] * A)).add_((dt * xs32)[..., None] * B.float()[:, None, :])
        y = (state.ssm @ C.float()[..., None])[..., 0] + self.D.float() * xs32
        y = y * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))[:, None]

    def kernel_weights(self, w: dict[str, np.ndarray]) -> dict:
        """``MambaLayer``'s fields from ``W_in`` on, from this mixer's parameters (their numpy views ``w``)."""
        norms = self.inner_norms
        return dict(
            W_in=w["in_proj.weight"], b_in=w.get("in_proj.bias", EMPTY), conv_w=w["conv1d.weight"][:, 0],
            conv_b=w.get("conv1d.bias", EMPTY), W_x=w["x_proj.weight"], W_dt=w["dt_proj.weight"],
            dt_bias=w["dt_proj.bias"], A_log=w["A_log"], D=w["D"], W_out=w["out_proj.weight"],
            b_out=w.get("out_proj.bias", EMPTY),
            norm_dt=w.get("dt_layernorm.weight", EMPTY), norm_B=w.get("b_layernorm.weight", EMPTY),
            norm_C=w.get("c_layernorm.weight", EMPTY), eps=np.float32(self.dt_layernorm.eps if norms else 0.0),
            flags=np.array(["in_proj.bias" in w, "conv1d.bias" in w, "out_proj.bias" in w, norms], dtype=np.bool_))

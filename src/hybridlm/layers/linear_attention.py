"""Linear attention: softmax's exp(qᵀk) replaced by a feature map's φ(q)ᵀφ(k), so the attention becomes a recurrence
with a fixed-size state, S_t = a_t ⊙ S_{t-1} + φ(k_t) v_tᵀ and o_t = S_tᵀ φ(q_t), like an SSM's.

One mixer covers the published variants through its options (``config.mixer_options[letter]``):

- ``feature_map``: ``elu1`` (Katharopoulos et al. 2020), ``performer`` (FAVOR+, Choromanski et al. 2021),
  ``taylor`` (Based, Arora et al. 2024), ``identity`` (GLA, RetNet); see ``ops/linear_attention/feature_maps``.
- ``decay`` a_t: ``none``; ``fixed``, one per head, γ_h = 1 − 2^(−5−h) (RetNet, Sun et al. 2023); ``gla``, a
  data-dependent gate per key feature, a_t = exp(logsigmoid(x W_down W_up + b) / 16) (GLA, Yang et al. 2024, with its
  low rank 16 and normaliser 16).
- ``norm`` of the output: ``normalize`` divides by φ(q)ᵀΣ a φ(k) (Katharopoulos), ``rms`` is an RMSNorm per head
  (RetNet's and GLA's group norm), ``none``.
- ``output_gate``: o ⊙ SiLU(x W_g) (RetNet, GLA); ``short_conv``: a depthwise causal conv of that width (+ SiLU)
  over q, k and v (Based; flash-linear-attention's short convolution).
- ``key_dim`` (q/k width a head before the map; default ``head_dim``), ``n_features`` (the Performer's m),
  ``chunk_size`` (the chunked form's chunk).

Heads, grouped key/value heads and the value width are the config's ``n_heads``, ``n_kv_heads`` and ``head_dim``.
The normaliser is the state's extra column: values get a column of ones, so one recurrence carries both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import ops
from hybridlm.config import invalid
from hybridlm.layers.linear import Linear, project
from hybridlm.layers.mixer import mixer_options
from hybridlm.layers.norm import RMSNorm, block_arguments
from hybridlm.layers.numpy_views import kernel_arguments
from hybridlm.layers.ssm import SSMState
from hybridlm.ops.linear_attention.feature_maps import (
    FEATURE_MAPS,
    NORMALIZER_EPS,
    feature_dim,
    feature_map,
    orthogonal_features,
)
from hybridlm.ops.step.block import EMPTY
from hybridlm.ops.step.linear_attention import (
    DECAY_CODES,
    FEATURE_CODES,
    NO_ROWS,
    NORM_CODES,
    LinearAttentionLayer,
)

if TYPE_CHECKING:
    from hybridlm.config import ModelConfig

DECAYS = ("none", "fixed", "gla")
NORMS = ("normalize", "rms", "none")
GLA_GATE_RANK, GLA_GATE_NORMALIZER = 16, 16  # Yang et al. 2024, section 4.4
MAX_TAYLOR_KEY_DIM = 64  # 1 + 64 + 64² = 4,161 features a head: beyond, the state no longer fits a cache


@dataclass(frozen=True)
class LinearAttentionOptions:
    """The options of a linear-attention mixer (see the module docstring), read from ``config.mixer_options``."""

    feature_map: str = "elu1"
    decay: str = "none"
    norm: str = "normalize"
    output_gate: bool = False
    short_conv: int = 0  # conv width; 0: none
    key_dim: int | None = None  # None: head_dim
    n_features: int | None = None  # the Performer's random features; None: key_dim
    chunk_size: int = 64

    @classmethod
    def of(cls, config: ModelConfig, letter: str) -> LinearAttentionOptions:
        """The options of the mixer of ``letter``, checked: ``config.invalid`` names the first bad one."""
        options, name = mixer_options(cls, config, letter, "linear attention")
        for option, choices in (("feature_map", FEATURE_MAPS), ("decay", DECAYS), ("norm", NORMS)):
            if getattr(options, option) not in choices:
                raise invalid(name(option), f"one of {choices}", getattr(options, option))
        if not isinstance(options.output_gate, bool):
            raise invalid(name("output_gate"), "True or False", options.output_gate)
        for option, low, optional in (("short_conv", 0, False), ("chunk_size", 1, False), ("key_dim", 1, True),
                                      ("n_features", 1, True)):
            value = getattr(options, option)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid(name(option), f"an integer >= {low}" + (" or None" if optional else ""), value)
        if options.n_features is not None and options.feature_map != "performer":
            raise invalid(name("n_features"), "None unless feature_map is 'performer' (only it draws features)",
                          options.n_features)
        key_dim = options.key_dim or config.head_dim
        if options.feature_map == "taylor" and key_dim > MAX_TAYLOR_KEY_DIM:
            raise invalid(name("key_dim"), f"at most {MAX_TAYLOR_KEY_DIM} with the taylor map (its 1 + d + d² "
                          f"features a head: {1 + key_dim + key_dim ** 2} at key_dim={key_dim})", key_dim)
        if options.norm == "normalize" and options.feature_map == "identity":
            raise invalid(name("norm"), "'rms' or 'none' with the identity map (the normaliser φ(q)ᵀΣφ(k) needs "
                          "positive features)", options.norm)
        return options


@dataclass
class LinearAttentionState(SSMState):
    """Fixed-size state of one linear-attention layer: ``ssm`` is S (b, h_kv, features, e), with the normaliser as
    its last column when the mixer divides by it; ``conv`` the short conv's last inputs ((b, 0, 1) without one)."""

    description: ClassVar[str] = "linear-attention state (fixed size)"


class LinearAttention(nn.Module):
    """q/k/v projections (+ short conv), feature maps, the decayed linear-attention recurrence (chunked for a
    sequence, one step a token), the output norm and gate, o_proj."""

    kind = "linear_attention"
    label = "linear attention"
    # The config fields that decide what it computes (its own options are compared with mixer_options)
    semantic_fields = ("n_heads", "n_kv_heads", "head_dim")

    @staticmethod
    def check_config(config: ModelConfig, letter: str) -> None:
        if config.n_heads % config.n_kv_heads:
            raise invalid("n_kv_heads", f"a divisor of n_heads={config.n_heads}", config.n_kv_heads)
        LinearAttentionOptions.of(config, letter)

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        options = self.options = LinearAttentionOptions.of(config, config.layers[layer_idx])
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.key_dim = options.key_dim or config.head_dim
        n_features = options.n_features or self.key_dim
        self.feature_dim = feature_dim(options.feature_map, self.key_dim, n_features)
        d, dk, dv = config.d_model, self.key_dim, self.head_dim
        self.q_proj = Linear(d, self.n_heads * dk, bias=False)
        self.k_proj = Linear(d, self.n_kv_heads * dk, bias=False)
        self.v_proj = Linear(d, self.n_kv_heads * dv, bias=False)
        self.g_proj = Linear(d, self.n_heads * dv, bias=False) if options.output_gate else None
        self.o_proj = Linear(self.n_heads * dv, d, bias=False)
        self.conv_dim = (self.n_heads + self.n_kv_heads) * dk + self.n_kv_heads * dv
        self.conv1d = (nn.Conv1d(self.conv_dim, self.conv_dim, options.short_conv, groups=self.conv_dim,
                                 padding=options.short_conv - 1, bias=False) if options.short_conv else None)
        if options.feature_map == "performer":  # drawn once: a checkpoint holds it, so a reload computes the same
            self.register_buffer("feature_projection", orthogonal_features(n_features, dk))
        else:
            self.feature_projection = None
        if options.decay == "fixed":
            gamma = 1 - 2.0 ** (-5 - torch.arange(self.n_kv_heads, dtype=torch.float64))
            self.register_buffer("fixed_log_decay", torch.log(gamma).float(), persistent=False)
        if options.decay == "gla":
            self.gk_down = Linear(d, GLA_GATE_RANK, bias=False)
            self.gk_up = Linear(GLA_GATE_RANK, self.n_kv_heads * self.feature_dim, bias=True)
        self.o_norm = RMSNorm(dv, config.norm_eps) if options.norm == "rms" else None
        self.value_width = dv + (options.norm == "normalize")  # e: the normaliser's column of ones

    def prefill_work(self, length: int) -> tuple[float, float]:
        """(FLOPs, exps) per token beyond the projections: the chunk-local products q kᵀ and (q kᵀ) v, the state
        update and its read; the feature maps' and decays' exps."""
        chunk = min(16 if self.options.decay == "gla" else self.options.chunk_size, length)
        f, e, r = self.feature_dim, self.value_width, self.n_heads // self.n_kv_heads
        flops = self.n_kv_heads * (2.0 * chunk * (f + e) * r + 2.0 * f * e * (1 + r))
        exps = (self.n_heads + self.n_kv_heads) * f * (self.options.feature_map == "performer")
        exps += self.n_kv_heads * chunk * (f if self.options.decay == "gla" else 1) * (self.options.decay != "none")
        return flops, float(exps)

    def init_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   max_len: int = 0) -> LinearAttentionState:
        dtype = dtype or self.q_proj.weight.dtype
        width = self.options.short_conv
        conv = (torch.zeros(batch_size, self.conv_dim, width, device=device, dtype=dtype) if width
                else torch.zeros(batch_size, 0, 1, device=device, dtype=dtype))
        S = torch.zeros(batch_size, self.n_kv_heads, self.feature_dim, self.value_width, device=device,
                        dtype=torch.float32)
        return LinearAttentionState(conv=conv, ssm=S)

    # ----------------------------------------------------------------------------------------------- pieces
    def _projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: (..., d_model) -> [q (..., h dk), k (..., h_kv dk), v (..., h_kv dv)] (+ g (..., h dv) with the gate)
        return project(x, tuple(p for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj) if p is not None))

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        # x: (b, l, d_model) -> None, (b, h_kv, l) (fixed) or (b, h_kv, l, features) (gla); <= 0
        b, length, _ = x.shape
        if self.options.decay == "fixed":
            return self.fixed_log_decay[None, :, None].expand(b, -1, length)
        if self.options.decay == "gla":
            logits = self.gk_up(self.gk_down(x)).float()
            gate = F.logsigmoid(logits) / GLA_GATE_NORMALIZER
            return gate.view(b, length, self.n_kv_heads, self.feature_dim).transpose(1, 2)
        return None

    def _features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (..., dk), k: (..., dk) -> φ(q), φ(k): (..., features)
        kind, W = self.options.feature_map, self.feature_projection
        return feature_map(q, kind, W, query=True), feature_map(k, kind, W)

    def _output(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        # o: (b, h, l, e) -> (b, l, d_model): the normaliser or the norm, the output gate, o_proj
        b, _, length, _ = o.shape
        if self.options.norm == "normalize":
            o = o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS)
        elif self.o_norm is not None:
            o = self.o_norm(o)
        o = o.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim)
        if gate is not None:
            o = o * F.silu(gate)
        return self.o_proj(o)

    def _values(self, v: torch.Tensor) -> torch.Tensor:
        # v: (..., dv) -> (..., e): the column of ones the normaliser accumulates
        return torch.cat([v, torch.ones_like(v[..., :1])], -1) if self.options.norm == "normalize" else v

    # ------------------------------------------------------------------------------------------- the forms
    def forward(self, x: torch.Tensor, state: LinearAttentionState | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        # x: (b, l, d_model), mask: (b, l) bool (False at left padding) -> (b, l, d_model)
        b, length, _ = x.shape
        q, k, v, *gate = self._projections(x)
        keep = None if mask is None else mask[..., None].to(x.dtype)
        if self.conv1d is not None:
            qkv = torch.cat([q, k, v], -1)
            if keep is not None:  # padding must not enter the conv's window (see Mamba.forward)
                qkv = qkv * keep
            qkv, conv_state = ops.causal_conv1d(qkv, self.conv1d.weight[:, 0], None,
                                                None if state is None else state.conv)
            if state is not None:
                state.conv.copy_(conv_state)
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
        q = q.view(b, length, self.n_heads, self.key_dim).transpose(1, 2)
        k = k.view(b, length, self.n_kv_heads, self.key_dim).transpose(1, 2)
        v = self._values(v.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2))
        q, k = self._features(q, k)
        log_decay = self._log_decay(x)
        if mask is not None:  # a padding position adds nothing to the state and does not decay it
            k, v = k * keep[:, None], v * keep[:, None]
            if log_decay is not None:
                log_decay = log_decay * (mask[:, None] if log_decay.dim() == 3 else mask[:, None, :, None])
        o, S = ops.linear_attention(q, k, v, log_decay, None if state is None else state.ssm,
                                    chunk_size=self.options.chunk_size)
        if state is not None:
            state.ssm.copy_(S)
        return self._output(o, gate[0] if gate else None)

    def step(self, x: torch.Tensor, state: LinearAttentionState) -> torch.Tensor:
        # x: (b, 1, d_model) -> (b, 1, d_model): the recurrence's step in torch ops, the state updated in place
        b = x.shape[0]
        q, k, v, *gate = self._projections(x[:, 0])
        if self.conv1d is not None:
            qkv = ops.causal_conv1d_step(torch.cat([q, k, v], -1), state.conv, self.conv1d.weight[:, 0], None)
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
        q, k = self._features(q.view(b, self.n_heads, self.key_dim), k.view(b, self.n_kv_heads, self.key_dim))
        v = self._values(v.view(b, self.n_kv_heads, self.head_dim))
        log_decay = self._log_decay(x)
        S = state.ssm
        if log_decay is not None:
            S.mul_(torch.exp(log_decay[:, :, 0])[..., None] if log_decay.dim() == 4
                   else torch.exp(log_decay[:, :, 0])[..., None, None])
        S.add_(k.float()[..., :, None] * v.float()[..., None, :])
        r = self.n_heads // self.n_kv_heads
        o = (q.float().view(b, self.n_kv_heads, r, 1, -1) @ S[:, :, None]).view(b, self.n_heads, 1, -1)
        return self._output(o.to(x.dtype), gate[0][:, None] if gate else None)

    def bind_step(self, state: LinearAttentionState, norm: RMSNorm | None = None
                  ) -> Callable[[np.ndarray], np.ndarray] | None:
        """This mixer's decode step as a call on float32 arrays, hidden (b, d_model) -> (b, d_model), with its weights,
        ``state`` and the block's ``norm`` (for ``hidden + mixer(norm(hidden))``) bound: the compiled kernel and nothing
        else. None where the dispatch picks the torch step or the tensors are outside the kernel's domain."""
        kernel = ops.step_kernel("linear_attention_step")
        weights, block, arrays = kernel_arguments(self, _kernel_weights), block_arguments(norm), state.kernel_arrays()
        if kernel is None or weights is None or block is None or arrays is None:
            return None
        residual, norm_w, norm_eps = block
        layer = LinearAttentionLayer(norm_w, norm_eps, *arrays, **weights)
        return partial(kernel, residual, layer)


def _kernel_weights(mixer: LinearAttention, w: dict[str, np.ndarray]) -> dict:
    # LinearAttentionLayer's fields from W_in on, from the mixer's parameters and buffers (numpy views ``w``)
    options = mixer.options
    rows = lambda name: w.get(f"{name}.weight", NO_ROWS)  # noqa: E731
    return dict(
        W_in=tuple(rows(p) for p in ("q_proj", "k_proj", "v_proj", "g_proj", "gk_down")), no_bias=(EMPTY,) * 5,
        conv_w=w["conv1d.weight"][:, 0] if "conv1d.weight" in w else NO_ROWS,
        projection=w.get("feature_projection", NO_ROWS), fixed_log_decay=w.get("fixed_log_decay", EMPTY),
        W_gk_up=rows("gk_up"), b_gk_up=w.get("gk_up.bias", EMPTY), o_norm_w=w.get("o_norm.weight", EMPTY),
        o_norm_eps=float(mixer.o_norm.eps) if mixer.o_norm is not None else 0.0, W_o=w["o_proj.weight"],
        codes=np.array([FEATURE_CODES[options.feature_map], DECAY_CODES[options.decay], NORM_CODES[options.norm],
                        mixer.n_heads, mixer.key_dim, options.short_conv > 0], dtype=np.int64))

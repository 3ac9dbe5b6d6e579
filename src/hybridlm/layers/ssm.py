"""What the two Mamba mixers share: their fixed-size state, the published dt initialisation, and the binding of
their fused decode kernels (Gu & Dao 2023, section 3.6, and mamba_ssm's modules)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import numba
import numpy as np
import torch
from numba.typed import List

from hybridlm import ops
from hybridlm.layers.norm import RMSNorm, block_arguments
from hybridlm.layers.numpy_views import kernel_arguments

if TYPE_CHECKING:
    from torch import nn


def dt_bias_init(n: int, dt_min: float, dt_max: float, dt_floor: float) -> torch.Tensor:
    """Biases whose softplus is a step size drawn log-uniformly from [dt_min, dt_max] (clamped at dt_floor)."""
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


@dataclass
class SSMState:
    """Fixed-size state of one Mamba-1 or Mamba-2 layer, whatever the context length."""

    conv: torch.Tensor  # (b, conv channels, d_conv): the last d_conv inputs of the causal conv
    ssm: torch.Tensor  # float32; Mamba-1 (b, d_inner, d_state), Mamba-2 (b, n_heads, headdim, d_state)

    length: ClassVar[int] = 0  # context positions held: none, the state does not grow
    description: ClassVar[str] = "conv + SSM state (fixed size)"
    bound_tensors: ClassVar[tuple[str, ...]] = ("conv", "ssm")  # kept by a bound decode step

    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def nbytes_at(self, context: int) -> int:
        """Bytes held after ``context`` tokens: the same at any context."""
        return self.nbytes()

    def select(self, rows: torch.Tensor, capacity: int = 0) -> SSMState:
        """A new state holding only sequences ``rows`` of this one (``capacity`` is for KV caches)."""
        return type(self)(*(getattr(self, f.name)[rows] for f in fields(self)))

    @staticmethod
    def cat(states: list[SSMState], capacity: int = 0) -> SSMState:
        """The states' sequences stacked into one batch."""
        return type(states[0])(*(torch.cat([getattr(s, f.name) for s in states]) for f in fields(SSMState)))

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(conv, ssm) as arrays sharing memory, for a decode kernel to update in place; None outside its domain
        (contiguous float32 CPU tensors)."""
        conv, ssm = self.conv, self.ssm
        if (conv.dtype != torch.float32 or conv.device.type != "cpu" or not conv.is_contiguous()
                or not ssm.is_contiguous()):
            return None
        return conv.numpy(), ssm.numpy()


class FusedSSMStep:
    """The fused decode binding of an SSM mixer. A mixer using it names ``step_op`` (its kernel's dispatch op),
    ``stack_kernel`` (the whole-model kernel) and ``layer_type`` (the named tuple of a block's kernel arguments), and
    gives its weights' fields of that tuple in ``kernel_weights``."""

    step_op: ClassVar[str]
    stack_kernel: ClassVar[Callable]
    layer_type: ClassVar[type[tuple]]

    def kernel_weights(self, w: dict[str, np.ndarray]) -> dict:
        """The fields of ``layer_type`` from the mixer's parameters, given their numpy views ``w`` by name."""
        raise NotImplementedError

    def step_layer(self, state: SSMState, norm: RMSNorm | None) -> tuple[bool, tuple] | None:
        """The step kernel's ``(residual, layer)`` arguments for this mixer, ``state`` and the block's ``norm``;
        None outside the kernel's domain (float32 CPU tensors)."""
        weights = kernel_arguments(self, type(self).kernel_weights)  # made once while the weights stay put
        block, arrays = block_arguments(norm), state.kernel_arrays()
        if weights is None or block is None or arrays is None:
            return None
        residual, norm_w, norm_eps = block
        return residual, self.layer_type(norm_w, norm_eps, *arrays, **weights)

    def bind_step(self, state: SSMState, norm: RMSNorm | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
        """This mixer's decode step as a call on float32 arrays, hidden (b, d_model) -> (b, d_model), with its weights,
        ``state`` and the block's ``norm`` (for ``hidden + mixer(norm(hidden))``) bound: the compiled kernel and
        nothing else. None where the dispatch picks the torch step or the tensors are outside the kernel's domain."""
        kernel = ops.step_kernel(self.step_op)
        bound = None if kernel is None else self.step_layer(state, norm)
        return None if bound is None else partial(kernel, *bound)

    @classmethod
    def bind_stack(cls, blocks: list[nn.Module], states: list[SSMState], embedding: np.ndarray, final_w: np.ndarray,
                   final_eps: float, head: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
        """A whole model of such blocks as one call a token, ids (b,) -> logits (b, vocab): the ``embedding``, the
        ``blocks`` (each a norm and a mixer of this class, its state in ``states``), the final RMSNorm and the LM
        ``head``, with no Python between the blocks' kernels. None where a block's kernel does not apply or the
        blocks' arguments differ in type (a typed List holds one type)."""
        bound = [block.mixer.step_layer(state, block.norm) for block, state in zip(blocks, states, strict=True)]
        if any(b is None or not b[0] for b in bound):
            return None
        layers = [layer for _, layer in bound]
        if len({numba.typeof(layer) for layer in layers}) != 1:
            return None
        return partial(cls.stack_kernel, embedding, List(layers), final_w, final_eps, head)

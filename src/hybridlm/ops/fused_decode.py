"""A model's one-token decode step as bound kernel calls (CPU, float32 inference): one call for a whole SSM model.

Each block's decode step is one fused kernel (norm, mixer and residual: ``bind_mamba_step`` and its kin), yet
reaching it through the modules (the block, the mixer, the dispatch, checking the weights, making the kernel's
arguments) cost ~70 us a layer, ~1.7 ms of a mamba-130m token: it all runs right after a kernel has streamed
megabytes of weights through the caches, so each Python step there finds its data evicted. ``fused_decode`` binds
the kernels once for a model and an inference state and keeps them with the state. Each token then checks, in a
few C-level loops, that no weight or state tensor was replaced and no forward hook added, and runs the bound
calls. Where every block is the same SSM mixer with nothing else (a Mamba or Mamba-2 model), the embedding, the
blocks and the head are one bound call (``bind_mamba_stack``). Otherwise blocks without a fused kernel (a
feed-forward, a mixer without a binder, a module with a forward hook, which expects its ``forward`` to run) run
through their modules as before.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from hybridlm.ops import dispatch
from hybridlm.ops.attention_step_numba import attention_step_numba, bind_attention_step
from hybridlm.ops.block_input import records_autograd
from hybridlm.ops.ffn_step_numba import bind_ffn_step
from hybridlm.ops.gemv import gated_mlp as gated_mlp_gemv
from hybridlm.ops.gemv import linear as linear_gemv
from hybridlm.ops.gemv import norm_linear
from hybridlm.ops.mamba_step_numba import (
    bind_mamba2_stack,
    bind_mamba2_step,
    bind_mamba_stack,
    bind_mamba_step,
    mamba2_step_numba,
    mamba_step_numba,
)
from hybridlm.ops.numpy_views import numpy_views

if TYPE_CHECKING:
    from hybridlm.model import HybridLM
    from hybridlm.state import InferenceState

_GLOBAL_HOOKS = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)


def _hook_dicts(modules: tuple[nn.Module, ...]) -> tuple[dict, ...]:
    # their forward and forward-pre hooks (registering a hook adds to these dicts in place)
    return tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook (global, or on one of ``modules``) expects to see these modules run. A fused step
    runs them without calling their ``forward``, so where this is true it steps aside for the module path."""
    return any(map(len, _GLOBAL_HOOKS)) or any(map(len, _hook_dicts(modules)))


# A mixer kind's decode op, the backend of it that the binder's kernel is, the binder: (mixer, its state, the
# block's norm) -> a call hidden -> hidden + mixer(norm(hidden)), and the binder of a model made only of such
# blocks (see bind_mamba_stack), or None.
BINDERS: dict[str, tuple[str, Callable, Callable, Callable | None]] = {
    "mamba": ("mamba_step", mamba_step_numba, bind_mamba_step, bind_mamba_stack),
    "mamba2": ("mamba2_step", mamba2_step_numba, bind_mamba2_step, bind_mamba2_stack),
    "attention": ("attention_step", attention_step_numba, bind_attention_step, None),
}
_STATE_TENSORS = ("conv", "ssm")  # bound by the SSM binders; a KV cache's tensors are looked up on every call


class FusedDecode:
    """The bound decode step of ``model`` with ``state``; ``fused_decode`` makes and checks it."""

    def __init__(self, model: HybridLM, state: InferenceState) -> None:
        self.model = model
        self.views = numpy_views(model)
        self.layer_states = list(state.layers)
        held = [(s, name) for s in state.layers for name in _STATE_TENSORS if hasattr(s, name)]
        self.holders, self.names = tuple(s for s, _ in held), tuple(n for _, n in held)
        self.held = tuple(getattr(s, n) for s, n in held)
        self.blocks = list(model.layers)
        self.backends = os.environ.get(dispatch.ENV_VAR)
        self.steps = [self._bind(block, s) for block, s in zip(self.blocks, state.layers, strict=True)]
        self.ffn_steps = [self._bind_ffn(block) for block in self.blocks]
        self.bound_moe = any(step is not None and ffn_step is not None and block.ffn.kind == "moe"
                             for block, step, ffn_step in zip(self.blocks, self.steps, self.ffn_steps, strict=True))
        head = self._head_arguments(model)
        self.head = None if head is None else partial(norm_linear, *head)
        self.stack = None if head is None else self._bind_stack(model, state, head)
        # How many hooks each had: one added or removed later, and the blocks are bound again
        watched = (model.embedding, model.norm_f, model.lm_head,
                   *(m for b in self.blocks for m in (b, b.mixer, b.norm, b.ffn, b.ffn_norm) if m is not None))
        self.hook_dicts = _GLOBAL_HOOKS + _hook_dicts(watched)
        self.hook_counts = tuple(map(len, self.hook_dicts))

    @staticmethod
    def _bind(block: nn.Module, layer_state) -> Callable | None:
        # Only where the dispatch would choose this kernel for the op (a forced backend wins)
        op, kernel, bind, _ = BINDERS.get(block.mixer.kind, (None, None, None, None))
        if op is None or dispatch.kernel(op, torch.device("cpu")) is not kernel or hooked(block, block.mixer,
                                                                                             block.norm):
            return None
        return bind(block.mixer, layer_state, block.norm)

    @staticmethod
    def _bind_ffn(block: nn.Module) -> Callable | None:
        # The block's feed-forward half as one call, where the dispatch would take the matrix-vector kernel for its
        # SwiGLU products and neither the feed-forward nor its norm is hooked
        if (block.ffn is None or dispatch.kernel("gated_mlp", torch.device("cpu")) is not gated_mlp_gemv
                or hooked(block.ffn, block.ffn_norm)):
            return None
        return bind_ffn_step(block.ffn, block.ffn_norm)

    @staticmethod
    def _head_arguments(model: HybridLM) -> tuple | None:
        # The final norm and the LM head's arguments of ``norm_linear`` (hidden (b, d_model) -> logits), where the
        # dispatch would take the matrix-vector kernel for the head and neither module is hooked
        head, norm = model.lm_head, model.norm_f
        if (head.bias is not None or dispatch.kernel("linear", torch.device("cpu")) is not linear_gemv
                or hooked(norm, head)):
            return None
        return numpy_views(norm)["weight"], norm.eps, numpy_views(head)["weight"]

    def _bind_stack(self, model: HybridLM, state: InferenceState, head: tuple) -> Callable | None:
        # The whole step as one call (ids (b,) -> logits (b, vocab)) where every block is bound, of one kind with a
        # stack binder, with no feed-forward, and the embedding is not hooked
        if None in self.steps:
            return None
        kind = self.blocks[0].mixer.kind  # every block is bound, so its kind has a binder
        stack = BINDERS[kind][3]
        if (stack is None or any(block.mixer.kind != kind or block.ffn is not None for block in self.blocks)
                or hooked(model.embedding)):
            return None
        return stack(self.blocks, self.layer_states, numpy_views(model.embedding)["weight"], *head)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of hidden states ``x`` (b, 1, d_model) after every block: the final norm and the LM head,
        bound (``head``); the modules where those are not bound."""
        if self.head is None:
            return self.model.lm_head(self.model.norm_f(x))
        return torch.from_numpy(self.head(x.detach().contiguous().numpy().reshape(x.shape[0], -1)))[:, None]

    def unchanged(self, model: HybridLM, state: InferenceState, views: dict) -> bool:
        """Whether ``model`` (its ``numpy_views``, just checked), ``state``'s tensors and the blocks' forward hooks
        are still as bound."""
        return (model is self.model and views is self.views
                and os.environ.get(dispatch.ENV_VAR) == self.backends
                and tuple(map(len, self.hook_dicts)) == self.hook_counts
                and all(map(operator.is_, state.layers, self.layer_states))
                and all(map(operator.is_, map(getattr, self.holders, self.names), self.held)))

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # input_ids: (b, 1) -> logits (b, 1, vocab), the MoE auxiliary loss (None: no MoE)
        if self.stack is not None:
            ids = np.ascontiguousarray(input_ids.numpy()[:, 0], dtype=np.int64)
            return torch.from_numpy(self.stack(ids))[:, None], None
        x = self.model.embedding(input_ids)
        b = x.shape[0]
        hidden = x.detach().contiguous().numpy().reshape(b, -1)
        aux_loss, moe_loss = None, 0.0  # the bound feed-forwards' losses add up as Python floats
        for block, step, ffn_step, layer_state in zip(self.blocks, self.steps, self.ffn_steps, self.layer_states,
                                                      strict=True):
            aux = None
            if step is None:
                out, aux = block(torch.from_numpy(hidden).view(b, 1, -1), layer_state)
                hidden = out.contiguous().numpy().reshape(b, -1)
            else:
                hidden = step(hidden)
                if ffn_step is not None:
                    hidden, loss = ffn_step(hidden)
                    moe_loss += loss
                elif block.ffn is not None:
                    h = torch.from_numpy(hidden).view(b, 1, -1)
                    y, aux = block.ffn(block.ffn_norm(h))
                    hidden = (h + y).numpy().reshape(b, -1)
            if aux is not None:
                aux_loss = aux if aux_loss is None else aux_loss + aux
        if self.bound_moe:
            moe = torch.tensor(moe_loss, dtype=torch.float32)
            aux_loss = moe if aux_loss is None else aux_loss + moe
        return self.logits(torch.from_numpy(hidden).view(b, 1, -1)), aux_loss


def fused_decode(model: HybridLM, state: InferenceState, input_ids: torch.Tensor) -> FusedDecode | None:
    """The bound decode step of ``model`` with ``state`` for one token a sequence (``input_ids`` (b, 1), on CPU),
    made at the first step and kept on the state while nothing was replaced; None outside float32 inference."""
    if records_autograd(model):
        return None
    views = numpy_views(model)  # the weights' check, once a token; None unless all are float32 CPU tensors
    if views is None:
        return None
    fused = state.fused_decode
    if fused is None or not fused.unchanged(model, state, views):
        fused = state.fused_decode = FusedDecode(model, state)
    return fused if any(step is not None for step in fused.steps) else None

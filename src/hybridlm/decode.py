"""One decode step of a whole model: the single place that chooses between the bound kernels and the modules.

``is_decode_step`` is the guard (one token a sequence, a state, no padding mask, no labels), ``decode_step`` the
step. On the CPU in float32 inference each block's step is one fused kernel (norm, mixer and residual: the mixer's
``bind_step``), its feed-forward half another (``bind_step`` of the feed-forward), and the final norm with the LM
head a third. Reaching those kernels through the modules (the block, the mixer, the dispatch, checking the weights,
making the kernel's arguments) cost tens of microseconds a layer: it all runs right after a kernel has streamed
megabytes of weights through the caches, so each Python step there finds its data evicted. ``FusedDecode`` binds the
kernels once for a model and an inference state and keeps them with the state. Each token then checks, in a few
C-level loops, that no weight or state tensor was replaced and no forward hook added, and runs the bound calls. Where
every block is the same SSM mixer with nothing else (a Mamba or Mamba-2 model), the embedding, the blocks and the
head are one call (the mixer class's ``bind_stack``). Blocks without a bound kernel (a mixer without ``bind_step``, a
backend forced to torch, a module with a forward hook, which expects its ``forward`` to run, or a module wrapped by
another library, such as a LoRA adapter) run through their modules.
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

from hybridlm import ops
from hybridlm.layers.numpy_views import numpy_views
from hybridlm.ops.gemm.numba_ops import linear as linear_gemv
from hybridlm.ops.step.head import norm_linear
from hybridlm.state import InferenceState

if TYPE_CHECKING:
    from hybridlm.model import HybridLM

_GLOBAL_HOOKS = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)


def _hook_dicts(modules: tuple[nn.Module, ...]) -> tuple[dict, ...]:
    # their forward and forward-pre hooks (registering a hook adds to these dicts in place)
    return tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))


def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook (global, or on one of ``modules``) expects to see these modules run. A bound step
    runs them without calling their ``forward``, so where this is true it steps aside for the module path."""
    return any(map(len, _GLOBAL_HOOKS)) or any(map(len, _hook_dicts(modules)))


OWN_MODULES = ("hybridlm.", "torch.nn.modules.")


def wrapped(*modules: nn.Module) -> bool:
    """Whether a module of another library (a LoRA layer from peft, a parametrization) sits inside ``modules``:
    it changes what their forward computes, which a bound step, reading the weights directly, would miss."""
    return any(not type(m).__module__.startswith(OWN_MODULES) or hasattr(m, "parametrizations")
               for module in modules for m in module.modules())


def records_autograd(*modules: nn.Module | None) -> bool:
    """Whether autograd would record a pass through ``modules`` (grad enabled and a parameter requiring it): the
    fused kernels have no backward, so they step aside."""
    return torch.is_grad_enabled() and any(p.requires_grad for m in modules if m is not None for p in m.parameters())


def is_decode_step(input_ids: torch.Tensor, state: InferenceState | None, mask: torch.Tensor | None,
                   labels: torch.Tensor | None) -> bool:
    """Whether a forward call is a decode step: one token a sequence, continuing ``state``, no padding, no loss."""
    return state is not None and mask is None and labels is None and input_ids.shape[1] == 1


def decode_step(model: HybridLM, state: InferenceState, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of ``model``: ``input_ids`` (b, 1) -> logits (b, 1, vocab) and the MoE auxiliary loss,
    ``state`` advanced in place; the bound kernels where they apply, else the blocks' modules."""
    fused = fused_decode(model, state)
    if fused is not None:
        logits, aux = fused(input_ids)
        aux_loss = torch.zeros((), dtype=torch.float32)
        return logits, aux_loss if aux is None else aux_loss + aux
    x = model.embedding(input_ids)
    aux_loss = x.new_zeros((), dtype=torch.float32)
    for block, layer_state in zip(model.layers, state.layers, strict=True):
        x, aux = _module_step(block, x, layer_state)
        if aux is not None:
            aux_loss = aux_loss + aux
    return model.lm_head(model.norm_f(x)), aux_loss


def _module_step(block: nn.Module, x: torch.Tensor, layer_state: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    # x: (b, 1, d_model) -> the block's decode step through its modules: its forward where a hook expects to see it
    return block(x, layer_state) if hooked(block, block.mixer, block.norm) else block.step(x, layer_state)


class FusedDecode:
    """The bound decode step of ``model`` with ``state``; ``fused_decode`` makes and checks it."""

    def __init__(self, model: HybridLM, state: InferenceState) -> None:
        self.model = model
        self.views = numpy_views(model)
        self.layer_states = list(state.layers)
        held = [(s, name) for s in state.layers for name in s.bound_tensors]
        self.holders, self.names = tuple(s for s, _ in held), tuple(n for _, n in held)
        self.held = tuple(getattr(s, n) for s, n in held)
        self.blocks = list(model.layers)
        self.backends = os.environ.get(ops.dispatch.ENV_VAR)
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
    def _bind(block: nn.Module, layer_state: object) -> Callable | None:
        # The block's mixer step with its norm and residual, where the mixer has a fused step and nothing is hooked
        bind = getattr(block.mixer, "bind_step", None)
        if bind is None or hooked(block, block.mixer, block.norm) or wrapped(block.mixer, block.norm):
            return None
        return bind(layer_state, block.norm)

    @staticmethod
    def _bind_ffn(block: nn.Module) -> Callable | None:
        # The block's feed-forward half as one call, where neither the feed-forward nor its norm is hooked
        if block.ffn is None or hooked(block.ffn, block.ffn_norm) or wrapped(block.ffn, block.ffn_norm):
            return None
        return block.ffn.bind_step(block.ffn_norm)

    @staticmethod
    def _head_arguments(model: HybridLM) -> tuple | None:
        # The final norm and the LM head's arguments of ``norm_linear`` (hidden (b, d_model) -> logits), where the
        # dispatch would take the matrix-vector kernel for the head and neither module is hooked
        head, norm = model.lm_head, model.norm_f
        if (head.bias is not None or ops.dispatch.kernel("linear", torch.device("cpu")) is not linear_gemv
                or hooked(norm, head) or wrapped(norm, head)):
            return None
        return numpy_views(norm)["weight"], norm.eps, numpy_views(head)["weight"]

    def _bind_stack(self, model: HybridLM, state: InferenceState, head: tuple) -> Callable | None:
        # The whole step as one call (ids (b,) -> logits (b, vocab)) where every block is bound, of one mixer class
        # with a stack binder, with no feed-forward, and the embedding is not hooked
        if None in self.steps:
            return None
        mixer_class = type(self.blocks[0].mixer)
        bind_stack = getattr(mixer_class, "bind_stack", None)
        if (bind_stack is None or hooked(model.embedding) or wrapped(model.embedding)
                or any(type(block.mixer) is not mixer_class or block.ffn is not None for block in self.blocks)):
            return None
        return bind_stack(self.blocks, self.layer_states, numpy_views(model.embedding)["weight"], *head)

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
                and os.environ.get(ops.dispatch.ENV_VAR) == self.backends
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
                h = torch.from_numpy(hidden).view(b, 1, -1)
                out, aux = _module_step(block, h, layer_state)
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


def fused_decode(model: HybridLM, state: InferenceState) -> FusedDecode | None:
    """The bound decode step of ``model`` with ``state``, made at the first step and kept on the state while nothing
    was replaced; None outside float32 CPU inference or where the dispatch picks the modules
    (``HYBRIDLM_BACKEND=fused_decode=torch``)."""
    if ops.step_kernel("fused_decode") is None or records_autograd(model):
        return None
    views = numpy_views(model)  # the weights' check, once a token; None unless all are float32 CPU tensors
    if views is None:
        return None
    fused = state.fused_decode
    if fused is None or not fused.unchanged(model, state, views):
        fused = state.fused_decode = FusedDecode(model, state)
    return fused if any(step is not None for step in fused.steps) else None

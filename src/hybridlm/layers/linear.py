"""``nn.Linear`` whose product goes through the kernel dispatch (``ops.linear``).

Same parameters, state-dict keys and initialisation as ``nn.Linear``; the only difference is that a decode
step (a few rows of activations, on CPU, without autograd) uses the bandwidth-bound matrix-vector kernel
instead of a BLAS call that reads the weights at half the machine's bandwidth.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import ops


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        return ops.linear(x, self.weight, self.bias)


def is_plain(*modules: nn.Module) -> bool:
    """Whether ``modules`` are all our own ``Linear``, whose weights a kernel may read directly. A module that wraps
    one (a LoRA adapter from peft) adds to its product in its ``forward``, which must then run."""
    return all(type(m) is Linear for m in modules)


def project(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Every module's product of ``x`` (..., d): one pass over ``x`` for plain layers (``ops.linears``), else
    each module's own forward."""
    if is_plain(*modules):
        return list(ops.linears(x, tuple(m.weight for m in modules), tuple(m.bias for m in modules)))
    return [m(x) for m in modules]


def product_without_bias(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module``'s product of ``x`` without its bias (the caller adds the bias elsewhere, as the selective scan
    does with ``dt_bias``)."""
    if is_plain(module):
        return ops.linear(x, module.weight)
    y = module(x)
    return y if module.bias is None else y - module.bias

"""numpy views of a module's weights for the numba kernels, made once and reused while the weights stay put.

A decode step calls its kernel once per layer and token. Making the kernel's arguments there, each weight
looked up through ``nn.Module.__getattr__`` and turned into an array with ``.detach().numpy()``, cost ~40 us a
layer (~1.5 ms a token of mamba-130m's 24 layers, against ~13 ms of kernel time). The views are cached on the
module and remade when any of its tensors was replaced (``model.to(...)``, ``load_state_dict(assign=True)``,
``param.data = ...``): every call checks each tensor's storage address, ~3 us for a Mamba mixer. In-place
changes (an optimizer step, ``load_state_dict`` copying) keep the storage, and the views see them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

_KEY = "_hybridlm_numpy_views"  # in the module's __dict__: (paths, data pointers, views or None)
_ARGS_KEY = "_hybridlm_kernel_arguments"  # (the views they were made from, the builder, the arguments)


def _tensors(module: nn.Module, paths: list[tuple[tuple[str, ...], str]]) -> list[torch.Tensor]:
    # Straight through _modules / _parameters / _buffers: nn.Module.__getattr__ is the slow part.
    out = []
    for owner_path, leaf in paths:
        owner = module
        for name in owner_path:
            owner = owner._modules[name]
        tensor = owner._parameters.get(leaf)
        out.append(owner._buffers[leaf] if tensor is None else tensor)
    return out


def numpy_views(module: nn.Module) -> dict[str, np.ndarray] | None:
    """``module``'s parameters and buffers by name (as ``named_parameters`` / ``named_buffers`` give them) as
    numpy arrays sharing their memory; None when one is not a float32 CPU tensor (the kernels' domain)."""
    cached = module.__dict__.get(_KEY)
    if cached is not None:
        paths, pointers, views = cached
        if [t.data_ptr() for t in _tensors(module, paths)] == pointers:
            return views
    named = [*module.named_parameters(), *module.named_buffers()]
    paths = [(tuple(name.split(".")[:-1]), name.split(".")[-1]) for name, _ in named]
    tensors = [t for _, t in named]
    usable = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    views = {name: t.detach().numpy() for name, t in named} if usable else None
    module.__dict__[_KEY] = (paths, [t.data_ptr() for t in tensors], views)
    return views


def kernel_arguments(module: nn.Module, build: Callable[[nn.Module, dict[str, np.ndarray]], tuple]) -> tuple | None:
    """The arguments a kernel takes from ``module``, ``build(module, numpy_views(module))``, made once and kept
    with the views (None where the views are). A decode step's wrapper runs between two kernels that have
    streamed megabytes through the caches, and every dictionary lookup, slice and flag array it made there
    cost microseconds: ~1 ms a token of mamba-130m before they were kept."""
    views = numpy_views(module)
    if views is None:
        return None
    cached = module.__dict__.get(_ARGS_KEY)
    if cached is None or cached[0] is not views or cached[1] is not build:
        cached = module.__dict__[_ARGS_KEY] = (views, build, build(module, views))
    return cached[2]

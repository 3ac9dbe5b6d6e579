"""numpy views of a module's weights for the numba kernels, made once and reused while the weights stay put.

A decode step calls its kernel once per layer and token. Making the kernel's arguments there, each weight
looked up through ``nn.Module.__getattr__`` and turned into an array with ``.detach().numpy()``, cost tens of
microseconds a layer, a tenth of a small model's kernel time. The views are cached on the
module and remade when any of its tensors or submodules was replaced (``model.to(...)``,
``load_state_dict(assign=True)``, ``param.data = ...``, ``mixer.in_proj = ...``): every call checks each tensor's
storage address, and each one's identity when something was registered anywhere since the last check. In-place
changes (an optimizer step, ``load_state_dict`` copying) keep the storage, and the views see them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

_KEY = "_hybridlm_numpy_views"  # in the module's __dict__: a _Snapshot
_ARGS_KEY = "_hybridlm_kernel_arguments"  # (the views they were made from, the builder, the arguments)


# Every registration of a parameter, buffer or submodule in this process (``module.x = ...``,
# ``load_state_dict(assign=True)``) is counted: while the count stands still no dict slot can have changed, and a
# check needs only the tensors' storage addresses (``param.data = ...`` and ``model.to(...)`` move those, unhooked).
_registrations = 0


def _count_registration(*_: object) -> None:
    global _registrations
    _registrations += 1


for _register in (register_module_parameter_registration_hook, register_module_buffer_registration_hook,
                  register_module_module_registration_hook):
    _register(_count_registration)


@dataclass
class _Snapshot:
    """What a module's views were made from: each tensor and submodule on the way, and the dict slot holding it
    (a ``_parameters``, ``_buffers`` or ``_modules`` entry), so a check is a few C-level loops (``map``), no
    Python loop over the module tree: it runs once per layer or model and token, with the caches cold."""

    slots: tuple[dict, ...]
    names: tuple[str, ...]
    held: tuple[object, ...]  # what slots[i][names[i]] was
    tensors: tuple[torch.Tensor, ...]
    pointers: list[int]
    views: dict[str, np.ndarray] | None
    registrations: int  # the count when the slots were last seen unchanged

    def unchanged(self) -> bool:
        if list(map(torch.Tensor.data_ptr, self.tensors)) != self.pointers:
            return False
        if self.registrations != _registrations:
            if not all(map(operator.is_, map(dict.get, self.slots, self.names), self.held)):
                return False
            self.registrations = _registrations
        return True


def _snapshot(module: nn.Module) -> _Snapshot:
    slots: dict[tuple[int, str], tuple[dict, str, object]] = {}
    named = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in named:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            slots[id(owner._modules), part] = (owner._modules, part, owner._modules[part])
            owner = owner._modules[part]
        holder = owner._parameters if leaf in owner._parameters else owner._buffers
        slots[id(holder), leaf] = (holder, leaf, tensor)
    tensors = [t for _, t in named]
    usable = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    views = {name: t.detach().numpy() for name, t in named} if usable else None
    held = list(slots.values())
    return _Snapshot(tuple(d for d, _, _ in held), tuple(n for _, n, _ in held), tuple(o for _, _, o in held),
                     tuple(tensors), [t.data_ptr() for t in tensors], views, _registrations)


def numpy_views(module: nn.Module) -> dict[str, np.ndarray] | None:
    """``module``'s parameters and buffers by name (as ``named_parameters`` / ``named_buffers`` give them) as
    numpy arrays sharing their memory; None when one is not a float32 CPU tensor (the kernels' domain)."""
    snapshot = module.__dict__.get(_KEY)
    if snapshot is None or not snapshot.unchanged():
        snapshot = module.__dict__[_KEY] = _snapshot(module)
    return snapshot.views


def kernel_arguments(module: nn.Module, build: Callable[[nn.Module, dict[str, np.ndarray]], tuple]) -> tuple | None:
    """The arguments a kernel takes from ``module``, ``build(module, numpy_views(module))``, made once and kept
    with the views (None where the views are). A decode step's wrapper runs between two kernels that have
    streamed megabytes through the caches, and every dictionary lookup, slice and flag array it made there
    cost microseconds."""
    views = numpy_views(module)
    if views is None:
        return None
    cached = module.__dict__.get(_ARGS_KEY)
    if cached is None or cached[0] is not views or cached[1] is not build:
        cached = module.__dict__[_ARGS_KEY] = (views, build, build(module, views))
    return cached[2]

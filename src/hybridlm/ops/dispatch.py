"""The one place that decides which kernel runs each op.

Each op has backends, registered in order of preference with a predicate saying where they can run
(device, installed packages). ``kernel(op, device)`` returns the first that can run, unless a backend is
forced, either by the ``backend=`` argument of the op or by the environment variable
``HYBRIDLM_BACKEND`` (one name for all ops, e.g. ``"reference"``: it applies to every op that has a backend of
that name, the others keep their default; or per op: ``"selective_scan=reference,ssd=chunked"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "HYBRIDLM_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    runs_on: Callable[[torch.device], bool]


def MODULE_STEP(*args: object, **kwargs: object) -> None:  # noqa: N802 - a marker, named as a constant
    """The torch backend of a decode-step op: the module's own ``step`` runs. A marker for ``ops.step_kernel``, never
    called."""
    raise RuntimeError("MODULE_STEP marks the torch form of a decode-step op (the module's step); it is not called")


def FUSED(*args: object, **kwargs: object) -> None:  # noqa: N802
    """The numba backend of ``fused_decode``: the decode module binds the model's step kernels. A marker."""
    raise RuntimeError("FUSED marks the numba backend of fused_decode (hybridlm.decode binds it); it is not called")


_REGISTRY: dict[str, list[Backend]] = {}
# The choice per (op, device, backend argument, environment variable): a decode step asks ~50 times a token.
_CHOSEN: dict[tuple[str, torch.device, str | None, str | None], Callable] = {}


def register(op: str, name: str, fn: Callable,
             runs_on: Callable[[torch.device], bool] = lambda device: True, first: bool = False) -> None:
    """Add a backend for ``op``; ``first=True`` puts it ahead of those already registered."""
    backends = [b for b in _REGISTRY.setdefault(op, []) if b.name != name]
    backend = Backend(name, fn, runs_on)
    _REGISTRY[op] = [backend, *backends] if first else [*backends, backend]
    _CHOSEN.clear()


def backends(op: str) -> list[str]:
    """Names of the registered backends of ``op``, most preferred first."""
    return [b.name for b in _REGISTRY[op]]


def _forced(op: str) -> str | None:
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key.strip() == op:
            return value.strip()
    return None


def kernel(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The function that runs ``op`` on ``device``: the forced backend, else the first that runs there."""
    key = (op, device, backend, os.environ.get(ENV_VAR))
    fn = _CHOSEN.get(key)
    if fn is None:
        fn = _CHOSEN[key] = _choose(op, device, backend)
    return fn


def _choose(op: str, device: torch.device, backend: str | None) -> Callable:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_REGISTRY)}")
    name = backend or _forced(op)
    if name is not None and not backend and "=" not in os.environ.get(ENV_VAR, ""):
        known = {b.name for bs in _REGISTRY.values() for b in bs}
        if name in known and name not in backends(op):
            name = None  # a global override names no backend of this op: keep its default
    if name is not None:
        for b in _REGISTRY[op]:
            if b.name == name:
                if not b.runs_on(device):
                    raise RuntimeError(f"backend {name!r} for op {op!r} cannot run on device {device}")
                return b.fn
        source = "backend=" if backend else f"{ENV_VAR}"
        raise ValueError(f"{source}: unknown backend {name!r} for op {op!r}; expected one of {backends(op)}")
    for b in _REGISTRY[op]:
        if b.runs_on(device):
            return b.fn
    raise RuntimeError(f"no backend of op {op!r} runs on device {device}")

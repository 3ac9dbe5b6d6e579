"""Fully sharded data parallelism (FSDP2) under ``torchrun``, through torch's own engine.

``fully_shard`` (``torch.distributed.fsdp``) is applied to every block and then to the whole model: each process
keeps 1/N of every parameter, of its gradient and (since the optimizer is built on the sharded parameters) of
the AdamW moments; a block's parameters are all-gathered just before its forward and backward and freed after,
and gradients are reduce-scattered (averaged) across processes. For models that do not fit one device; models
that fit train faster with DDP, the default.

Checkpoints stay consolidated, in the single-process format: ``torch.distributed.checkpoint.state_dict`` gathers
the full model and optimizer state onto the main process (on CPU), which writes them, so a checkpoint written
under FSDP loads anywhere (``HybridLM.from_pretrained``, one process, DDP) and resumes under FSDP with any number
of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hybridlm.model import HybridLM
from hybridlm.ops import dispatch

# FSDP2 frees a block's gathered parameters by resizing their storage to 0, and torch refuses to resize a storage
# once ``Tensor.numpy()`` has exposed it (``RuntimeError: Trying to resize storage that is not resizable``): so
# under FSDP the ops whose numba forms read parameters through numpy (in no-grad evaluation, or the scan's D in
# training too) run their torch forms. The selective scan has no torch form but its sequential reference: slow,
# which is why Mamba-1 models train faster with DDP where they fit.
TORCH_KERNELS = ("rms_norm=torch,gated_rms_norm=torch,linear=torch,linears=torch,gated_mlp=torch,"
                 "causal_conv1d=torch,decode_attention=torch,selective_scan=reference,ssd=chunked")


@contextlib.contextmanager
def torch_kernels() -> Iterator[None]:
    """Run the ops' torch forms (see ``TORCH_KERNELS``) inside, unless ``HYBRIDLM_BACKEND`` already chooses."""
    if os.environ.get(dispatch.ENV_VAR):
        yield
        return
    os.environ[dispatch.ENV_VAR] = TORCH_KERNELS
    try:
        yield
    finally:
        os.environ.pop(dispatch.ENV_VAR, None)


def shard(model: HybridLM) -> HybridLM:
    """Shard ``model`` in place across the default process group: one FSDP unit per block, then the root
    (embedding, final norm, head: tied weights stay one parameter in the root unit)."""
    if not isinstance(model, HybridLM):
        raise TypeError(f"fsdp: expected a HybridLM, got {type(model).__name__} (LoRA adapters are trained with DDP)")
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a number: ``clip_grad_norm_`` over sharded gradients returns a DTensor."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[HybridLM | None, list[dict[str, Any]],
                                                                        dict[str, torch.Tensor]]:
    """Collective (every process calls it): the full model as a plain CPU ``HybridLM``, the optimizer's parameter
    groups (parameters by name) and its state tensors (``name/field``), on the main process; None, [] and {}
    elsewhere."""
    plain = consolidate(model)
    opt = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU)
    if plain is None:
        return None, [], {}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in opt["param_groups"]]
    tensors = {f"{name}/{field}": value.detach().contiguous()
               for name, per_param in opt["state"].items() for field, value in per_param.items()}
    return plain, groups, tensors


def consolidate(model: nn.Module) -> HybridLM | None:
    """Collective: the trained model as a plain CPU ``HybridLM`` on the main process (None elsewhere), so that
    nothing outlives training that needs the process group (a sharded module's parameters hold its mesh)."""
    weights = get_model_state_dict(model, options=_FULL_ON_CPU)
    if not weights:  # not the main process: cpu_offload leaves the gathered state on rank 0 only
        return None
    # A real (not meta) module: it keeps non-persistent buffers and tied weights exactly as a fresh model has them.
    plain = HybridLM(model.config)
    plain.load_state_dict(weights)
    return plain


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]],
                   tensors: dict[str, torch.Tensor]) -> None:
    """Fill the sharded ``optimizer`` from a consolidated checkpoint's groups and tensors (each process takes its
    own shard of every moment)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    full = {"state": state,
            "param_groups": [{**g, "betas": tuple(g["betas"]), "params": list(g["params"])} for g in groups]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True))

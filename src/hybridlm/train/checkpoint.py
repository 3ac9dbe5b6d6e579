"""Training checkpoints: the model in hybridlm's checkpoint format plus everything needed to continue exactly.

A checkpoint directory holds ``config.json`` + ``model.safetensors`` (so ``HybridLM.from_pretrained`` and
``hybridlm eval`` read it as any model), ``optimizer.safetensors`` (AdamW moments and step counts, keyed by
parameter name), ``rng.safetensors`` (torch generator states) and ``trainer_state.json`` (step, the training
settings, the data description, the optimizer's hyperparameters). No pickle anywhere. The directory is written
beside its target and renamed into place, so an interruption (or a failed write: a full disk) never leaves half a
checkpoint and never touches the previous one. ``trainer_state.json`` is written last and records the sha256 of
every other file, so a checkpoint corrupted or truncated after it was written is refused on resume, naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hybridlm.atomic_files import atomic_directory
from hybridlm.model import HybridLM
from hybridlm.train.lora import is_adapter

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
FORMAT_VERSION = 1
CHECKSUMS_KEY = "sha256"  # in trainer_state.json: file name -> hex digest, for every other file of the checkpoint


def sha256_file(file: Path) -> str:
    """The hex sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): sha256_file(f) for f in sorted(directory.rglob("*"))
            if f.is_file() and f.name != STATE_NAME}


def verify_checksums(path: str | Path, state: dict[str, Any]) -> None:
    """Check every file listed in ``state``'s checksums against its sha256; a missing, truncated or altered file
    raises ``ValueError`` naming it. Checkpoints written before checksums were recorded are accepted as they are."""
    path = Path(path)
    for name, expected in state.get(CHECKSUMS_KEY, {}).items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"resume: {file} is missing from the checkpoint (its trainer_state.json lists it)")
        if sha256_file(file) != expected:
            raise ValueError(f"resume: {file} is corrupted or truncated: its sha256 differs from the one recorded "
                             f"in {path / STATE_NAME} when it was saved; resume from another checkpoint")


def _param_names(model: nn.Module) -> dict[int, str]:
    # id(parameter) -> its first name (tied weights share one parameter and one name)
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The optimizer's parameter groups (parameters by name) and state tensors (keyed ``name/field``, on CPU)."""
    names = _param_names(model)
    opt_state = optimizer.state_dict()
    groups, tensors = [], {}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    for group in opt_state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"})
        groups[-1]["params"] = [names[id(order[i])] for i in group["params"]]
    for index, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            tensors[f"{names[id(order[index])]}/{key}"] = value.detach().contiguous().cpu()
    return groups, tensors


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], tokenizer: Any = None, files: dict[str, str] | None = None,
                    optimizer_state: tuple[list[dict[str, Any]], dict[str, torch.Tensor]] | None = None) -> None:
    """Write the training checkpoint ``path`` atomically; ``state`` is the JSON-able trainer state, ``files`` more
    text files to write beside it (name -> content). A model with a LoRA adapter is saved as the adapter alone,
    in peft's format (``adapter_config.json``, ``adapter_model.safetensors``). ``optimizer_state``: the
    optimizer's groups and tensors already gathered (FSDP), instead of reading ``optimizer``."""
    groups, tensors = optimizer_state if optimizer_state is not None else named_optimizer_state(model, optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_directory(path) as tmp:
        if is_adapter(model):
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save(tmp)
        else:
            model.save_pretrained(tmp, tokenizer=tokenizer)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        save_file(tensors, str(tmp / OPTIMIZER_NAME), metadata={"library": "hybridlm"})
        save_file(rng, str(tmp / RNG_NAME))
        # Written last, with the digests of everything else: a checkpoint is whole only once this file exists.
        full = {"format": FORMAT_VERSION, **state, "optimizer_param_groups": groups,
                CHECKSUMS_KEY: _checksums(tmp)}
        (tmp / STATE_NAME).write_text(json.dumps(full, indent=2) + "\n")


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint directory, with a specific error if it is not one."""
    path = Path(path)
    file = path / STATE_NAME
    if not file.is_file():
        what = "a model checkpoint without training state" if (path / "config.json").is_file() else "not a checkpoint"
        raise FileNotFoundError(f"resume: {file} not found ({what}); expected a directory written by "
                                f"`hybridlm train` (its output directory or its checkpoint/ folder)")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"resume: {file} is corrupted or truncated (not valid JSON: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"resume: {file} is corrupted (not a JSON object)")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"resume: {file} has format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path, optimizer_factory, device: torch.device,
                    load_model: Callable[[Path], nn.Module] | None = None
                    ) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Model, optimizer (built by ``optimizer_factory(model)`` then filled) and trainer state of a checkpoint,
    after checking every file against the sha256 recorded when it was saved; the torch generator states are
    restored too. ``load_model(path)``: how the model is read (default: a
    ``HybridLM`` checkpoint; an adapter run gives the base model with the saved adapter)."""
    path = Path(path)
    state = read_state(path)
    verify_checksums(path, state)
    model = (HybridLM.from_pretrained(path, device=device, format="hybridlm") if load_model is None
             else load_model(path).to(device))
    optimizer = optimizer_factory(model)
    restore_rng(path)
    by_name = {name: p for name, p in model.named_parameters()}
    ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    tensors = read_optimizer_tensors(path, device)
    saved_groups = state["optimizer_param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"resume: {path} has {len(saved_groups)} optimizer parameter groups, expected "
                         f"{len(optimizer.param_groups)}")
    groups = []
    for saved, current in zip(saved_groups, optimizer.param_groups, strict=True):
        current_names = [n for n, p in by_name.items() if any(p is q for q in current["params"])]
        if sorted(saved["params"]) != sorted(current_names):
            raise ValueError(f"resume: {path}: the optimizer's parameters do not match this model's")
        # load_state_dict pairs saved and current parameters by position: list them in the current order.
        groups.append({**saved, "betas": tuple(saved["betas"]), "params": [ids[id(p)] for p in current["params"]]})
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        per_param.setdefault(ids[id(by_name[name])], {})[field] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return model, optimizer, state


def read_optimizer_tensors(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The optimizer state tensors of a checkpoint (keyed ``name/field``)."""
    return load_file(str(Path(path) / OPTIMIZER_NAME), device=str(device))


def restore_rng(path: str | Path) -> None:
    """Set the torch generator states saved in a checkpoint."""
    rng = load_file(str(Path(path) / RNG_NAME))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

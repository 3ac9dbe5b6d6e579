"""hybridlm's own checkpoint format, and the one place that reads and writes weight files.

Our format is a directory with ``config.json`` (a ModelConfig), the weights as ``model.safetensors`` (or, above
``max_shard_size``, shards ``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``, the
Hugging Face layout) and, when the model has one, the tokenizer's ``tokenizer.json``. Tied weights are stored once.

Every directory is written to a temporary directory beside the target and renamed into place, so a crash never
leaves a half-written checkpoint. ``WeightFiles`` reads the weights of any directory we import (safetensors,
sharded safetensors, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)`` only) and names the file,
the tensor and the shapes in every error.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hybridlm.atomic_files import atomic_directory

if TYPE_CHECKING:
    from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TOKENIZER_NAME = "tokenizer.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes per safetensors shard (the size Hugging Face uses by default)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file, the tensor and the shapes."""


# ------------------------------------------------------------------------------------------------- writing
def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``directory`` as one ``model.safetensors`` or, when their bytes exceed
    ``max_shard_size``, as shards plus ``model.safetensors.index.json``. Returns the file names written."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size: expected a positive number of bytes, got {max_shard_size}")
    metadata = {"format": "pt", **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
        return [WEIGHTS_NAME]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in tensors.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, directory / INDEX_NAME)
    return [*names, INDEX_NAME]


def model_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model``'s state dict as it is stored: a tied LM head once (as the embedding), float tensors cast to ``dtype``
    when given."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def write_checkpoint(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any = None,
                     max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write a checkpoint directory atomically: ``config`` as config.json, ``tensors`` as (sharded) safetensors, and
    the tokenizer's files when it has a ``save``. Every layout we write goes through here."""
    with atomic_directory(path) as tmp:
        write_json(config, tmp / CONFIG_NAME)
        write_weights(tensors, tmp, max_shard_size, metadata={"library": "hybridlm"})
        if tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(tmp)


# ------------------------------------------------------------------------------------------------- reading
class WeightFiles:
    """The tensors of a checkpoint directory, opened lazily: names, shapes and the file each one lives in.

    Reads, in this order of preference: ``model.safetensors.index.json`` (shards), ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin`` (``torch.load(weights_only=True)``: tensors only,
    never arbitrary pickled objects).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        d = self.directory
        if (d / INDEX_NAME).is_file():
            self._read_index(d / INDEX_NAME, self._open_safetensors)
        elif (d / WEIGHTS_NAME).is_file():
            self._open_safetensors(d / WEIGHTS_NAME)
        elif (d / TORCH_INDEX_NAME).is_file():
            self._read_index(d / TORCH_INDEX_NAME, self._open_torch)
        elif (d / TORCH_WEIGHTS_NAME).is_file():
            self._open_torch(d / TORCH_WEIGHTS_NAME)
        else:
            raise FileNotFoundError(f"{d}: no weights found; expected {WEIGHTS_NAME}, {INDEX_NAME}, "
                                    f"{TORCH_WEIGHTS_NAME} or {TORCH_INDEX_NAME}")

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def describe(self) -> str:
        files = self.files
        return str(files[0]) if len(files) == 1 else f"{self.directory} ({len(files)} weight files)"

    def names(self) -> set[str]:
        return set(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        if file in self._loaded:
            return self._loaded[file][name]
        try:
            with safe_open(str(file), "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {e} (corrupted or truncated file?)") from e

    def _read_index(self, index: Path, open_file) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index file (expected JSON with a 'weight_map'): {e}") from e
        for file in sorted(set(weight_map.values())):
            path = self.directory / file
            if not path.is_file():
                raise CheckpointError(f"{index}: lists shard {file}, which is missing from {self.directory}")
            open_file(path)
        for name, file in weight_map.items():
            if self._file_of.get(name) != self.directory / file:
                raise CheckpointError(f"{index}: tensor {name} is listed in {file} but is not in that file")

    def _add(self, name: str, shape: tuple[int, ...], file: Path) -> None:
        if name in self._file_of and self._file_of[name] != file:
            raise CheckpointError(f"{file}: tensor {name} is also in {self._file_of[name]}")
        self._file_of[name] = file
        self._shapes[name] = shape

    def _open_safetensors(self, file: Path) -> None:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    self._add(name, tuple(f.get_slice(name).get_shape()), file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file: {e} (corrupted or truncated?)") from e

    def _open_torch(self, file: Path) -> None:
        try:
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{file}: refused by torch.load(weights_only=True): it holds more than tensors "
                                  f"({str(e).splitlines()[0]}); convert it to safetensors with a tool you trust") from e
        except (RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"{file}: not a readable PyTorch weights file: {e} (corrupted or truncated?)") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a dict of tensor names to tensors, got {type(state).__name__}")
        for name, tensor in state.items():
            self._add(name, tuple(tensor.shape), file)
        self._loaded[file] = state


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (our parameter names) into ``model``; errors name ``source``, the tensor and the shapes."""
    if model.config.tie_embeddings and "embedding.weight" in tensors:
        tensors.setdefault("lm_head.weight", tensors["embedding.weight"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]} for a "
                              f"model of config {model.config.summary()}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors)

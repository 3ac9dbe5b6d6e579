"""Import and export of other checkpoint layouts: Hugging Face transformers and the official mamba_ssm.

One module per source format, each with one name-mapping table (see ``table.py``) and the translation of its
``config.json`` to and from our ModelConfig:

    ``hf_mamba``   MambaForCausalLM                    ``hf_llama``  LlamaForCausalLM, MistralForCausalLM,
    ``hf_mamba2``  Mamba2ForCausalLM                                 MixtralForCausalLM
    ``hf_jamba``   JambaForCausalLM                    ``mamba_ssm`` state-spaces/mamba's MambaLMHeadModel

``load_checkpoint(path)`` detects the layout from ``config.json`` (``architectures`` / ``model_type``; mamba_ssm's
``d_model`` + ``n_layer``; our own ``layers`` + ``d_model``). ``save_checkpoint(model, path, format="hf")`` writes
the Hugging Face class that holds the model (Mamba, Mamba2, Llama or Mixtral, Jamba). A Hugging Face export also
stores our full config under ``hybridlm_config`` in config.json (transformers keeps unknown keys), so
ours -> HF -> ours gives back the same config, byte-level vocabulary size included.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hybridlm.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    WEIGHTS_NAME,
    WeightFiles,
    load_state,
    model_tensors,
    write_checkpoint,
)
from hybridlm.config import ModelConfig
from hybridlm.interop import hf_jamba, hf_llama, hf_mamba, hf_mamba2, mamba_ssm
from hybridlm.interop.table import export_tensors, import_tensors
from hybridlm.layers import MIXERS

if TYPE_CHECKING:
    from hybridlm.model import HybridLM

FORMATS: dict[str, ModuleType] = {
    "hf_mamba": hf_mamba,
    "hf_mamba2": hf_mamba2,
    "hf_llama": hf_llama,
    "hf_jamba": hf_jamba,
    "mamba_ssm": mamba_ssm,
}
"""Every foreign layout, by name; ``"hybridlm"`` (our own) is handled by ``checkpoint.py``."""

STASH_KEY = "hybridlm_config"
_HF_BY_FAMILY = {"mamba": "hf_mamba", "mamba2": "hf_mamba2", "transformer": "hf_llama", "hybrid": "hf_jamba"}


def read_config_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; a checkpoint directory holds a {CONFIG_NAME}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_format(path: str | Path) -> str:
    """The layout of checkpoint directory ``path``: "hybridlm" or a key of ``FORMATS``."""
    data = read_config_json(path)
    if "architectures" in data or "model_type" in data:
        archs = data.get("architectures") or []
        for name, module in FORMATS.items():
            if set(archs) & set(module.ARCHITECTURES) or data.get("model_type") in module.MODEL_TYPES:
                return name
        supported = sorted(a for m in FORMATS.values() for a in m.ARCHITECTURES)
        raise ValueError(f"{Path(path) / CONFIG_NAME}: unsupported architecture {archs or data.get('model_type')!r}; "
                         f"supported: {supported} and the mamba_ssm layout")
    if mamba_ssm.detect(data):
        return "mamba_ssm"
    if "layers" in data and "d_model" in data:
        return "hybridlm"
    raise ValueError(f"{Path(path) / CONFIG_NAME}: cannot tell the layout: no 'architectures'/'model_type' "
                     f"(Hugging Face), no 'd_model'+'n_layer' (mamba_ssm), no 'layers'+'d_model' (hybridlm)")


def _semantics(c: ModelConfig) -> dict[str, Any]:
    """The fields that decide what a model computes, for the families it contains."""
    out: dict[str, Any] = dict(d_model=c.d_model, n_layers=c.n_layers, layers=c.layers, ffn=c.ffn_pattern,
                               norm_eps=c.norm_eps, tie=c.tie_embeddings, vocab=c.padded_vocab_size,
                               mixer_options=c.mixer_options)
    if set(c.ffn_pattern) - {"-"}:
        out.update(d_ff=c.d_ff)
    if "E" in c.ffn_pattern:
        out.update(n_experts=c.n_experts, top_k=c.top_k, normalize=c.moe_normalize_topk)
    for letter in set(c.layers):
        out.update({name: getattr(c, name) for name in MIXERS[letter].semantic_fields})
    return out


def config_from_source(module: ModuleType, source: dict[str, Any]) -> ModelConfig:
    """Our config for a foreign config.json: the stored hybridlm config when it still describes the same model
    (it keeps the tokenizer's vocab size and our training settings), else the translation of the source."""
    derived = module.to_config(source)
    stash = source.get(STASH_KEY)
    if isinstance(stash, dict):
        try:
            stored = ModelConfig.from_dict(stash)
        except (ValueError, TypeError) as e:
            warnings.warn(f"config.json: ignoring an invalid {STASH_KEY}: {e}", stacklevel=3)
            return derived
        if _semantics(stored) == _semantics(derived):
            return stored
        warnings.warn(f"config.json: {STASH_KEY} no longer matches the model the file describes; using the "
                      f"translated config", stacklevel=3)
    return derived


def load_config(path: str | Path, format: str | None = None) -> ModelConfig:
    """The ModelConfig of checkpoint directory ``path`` of any supported layout, without reading its weights."""
    format = format or detect_format(path)
    if format == "hybridlm":
        return ModelConfig.from_json(Path(path) / CONFIG_NAME)
    if format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; expected 'hybridlm' or one of {sorted(FORMATS)}")
    return config_from_source(FORMATS[format], read_config_json(path))


def load_checkpoint(path: str | Path, build: Callable[[ModelConfig], nn.Module], format: str | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint directory of any supported layout (detected from config.json unless ``format`` names
    one of "hybridlm" or ``FORMATS``) into ``build(config)`` (``HybridLM.from_pretrained`` passes its class). Errors
    name the file, the tensor and the shapes."""
    path = Path(path)
    format = format or detect_format(path)
    if format == "hybridlm" and not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path / CONFIG_NAME}: not found; a hybridlm checkpoint directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (or shards listed in {INDEX_NAME})")
    config = load_config(path, format)  # validates format
    model = build(config)
    files = WeightFiles(path)
    if format == "hybridlm":
        tensors = {name: files.get(name) for name in files.names()}
    else:
        module = FORMATS[format]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                    if not (config.tie_embeddings and k == "lm_head.weight")}
        # A tied checkpoint may still store the head (mamba_ssm does): it is the embedding, so skip it.
        ignore = (*module.IGNORE, *((r"lm_head\.weight",) if config.tie_embeddings else ()))
        tensors = import_tensors(module.TABLE, files, expected, ignore)
    load_state(model, tensors, files.describe())
    return model.to(device=device, dtype=dtype)


def resolve_format(model: HybridLM, format: str) -> str:
    """``format`` with "hf" replaced by the Hugging Face layout that holds ``model``'s family."""
    if format == "hf":
        family = model.config.family
        if family not in _HF_BY_FAMILY:
            raise ValueError(f"format 'hf': no Hugging Face layout holds a {family} model (layers "
                             f"{model.config.layers!r}); save it in hybridlm's own format")
        return _HF_BY_FAMILY[family]
    if format != "hybridlm" and format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; expected 'hybridlm', 'hf' or one of {sorted(FORMATS)}")
    return format


def save_checkpoint(model: HybridLM, path: str | Path, format: str = "hybridlm", tokenizer: Any = None,
                    dtype: torch.dtype | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write ``model`` to directory ``path`` (atomically) in ``format``: "hybridlm", "hf" (the Hugging Face class
    for its family) or a key of ``FORMATS``; with the tokenizer's files when it has them. Float tensors are
    cast to ``dtype`` when given. Returns the format written."""
    format = resolve_format(model, format)
    config, tensors = model.config, model_tensors(model, dtype)
    if format == "hybridlm":
        data = config.to_dict()
    else:
        module = FORMATS[format]
        data = module.from_config(config)
        tensors = export_tensors(module.TABLE, tensors)
        if format != "mamba_ssm":
            data["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
            data.update(_special_ids(tokenizer))
            data[STASH_KEY] = config.to_dict()
    write_checkpoint(path, data, tensors, tokenizer, max_shard_size)
    return format


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """bos/eos/pad ids for a Hugging Face config.json (generation reads them from there)."""
    if tokenizer is None:
        return {}
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {n: getattr(tokenizer, n) for n in names if getattr(tokenizer, n, None) is not None}


__all__ = ["FORMATS", "detect_format", "load_checkpoint", "load_config", "resolve_format", "save_checkpoint"]

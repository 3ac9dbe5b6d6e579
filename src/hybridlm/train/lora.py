"""LoRA adapters through ``peft`` (the ``post`` extra): which modules they target, saving and merging.

Default targets, for every family alike: each linear layer of every block (Mamba's ``in_proj``, ``x_proj``,
``dt_proj``, ``out_proj``; attention's ``q/k/v/o_proj``; the MLP's ``gate/up/down_proj``; the linear-attention
and LSH projections) and, in MoE blocks, the experts' stacked weights (peft's ``target_parameters``). Not the
embedding, the LM head or the MoE router. Every layer that a target names computes through its module's
``forward`` (``layers.linear.is_plain``) and the fused decode kernels step aside for wrapped modules, so an
adapter is never bypassed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hybridlm.layers.moe import MoE
from hybridlm.model import HybridLM

EXPERT_PARAMETERS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=tuple)  # module leaf names; empty: the defaults

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora r: expected a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora alpha: expected a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora dropout: expected a number in [0, 1), got {self.dropout!r}")

    @classmethod
    def parse(cls, text: str) -> LoraSettings:
        """``r=16,alpha=32,dropout=0.05,targets=in_proj+out_proj`` (every key optional; ``+`` joins targets)."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                if key == "r":
                    values["r"] = int(value)
                elif key in ("alpha", "dropout"):
                    values[key] = float(value)
                elif key == "targets":
                    values["targets"] = tuple(t for t in value.split("+") if t)
                else:
                    raise KeyError(key)
            except KeyError:
                raise ValueError(f"--lora: unknown key {key!r}; expected r, alpha, dropout, targets") from None
            except ValueError:
                raise ValueError(f"--lora: expected key=value items such as r=16,alpha=32,targets=q_proj+v_proj; "
                                 f"got {item!r}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def default_targets(model: HybridLM) -> tuple[list[str], list[str]]:
    """(module leaf names, expert parameter names): every block's linear layers but the router; MoE experts."""
    modules = sorted({name.rsplit(".", 1)[-1] for name, m in model.layers.named_modules()
                      if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != "router"})
    has_moe = any(isinstance(m, MoE) for m in model.modules())
    return modules, list(EXPERT_PARAMETERS) if has_moe else []


def _resolve(model: HybridLM, settings: LoraSettings) -> tuple[list[str], list[str]]:
    if not settings.targets:
        return default_targets(model)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)}
    expert_names = set(EXPERT_PARAMETERS) if any(isinstance(m, MoE) for m in model.modules()) else set()
    unknown = [t for t in settings.targets if t not in linear_names | expert_names]
    if unknown:
        raise ValueError(f"--lora targets: {unknown} match no linear layer of this model; it has "
                         f"{sorted(linear_names | expert_names)}")
    # a name may be both (a hybrid's MLP gate_proj and its MoE experts' gate_proj): it targets both
    return [t for t in settings.targets if t in linear_names], [t for t in settings.targets if t in expert_names]


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'hybridlm[post]'") from e
    return peft


def apply_lora(model: HybridLM, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped with a fresh LoRA adapter (a ``peft.PeftModel``; only the adapter trains)."""
    peft = _peft()
    modules, experts = _resolve(model, settings)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=modules or None, target_parameters=experts or None)
    return peft.get_peft_model(model, config)


def load_adapter(model: HybridLM, path: str | Path, trainable: bool = False) -> nn.Module:
    """``model`` with the peft adapter saved in ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"adapter: {path / ADAPTER_CONFIG} not found (expected a directory written by "
                                f"`hybridlm sft/dpo --lora`)")
    return _peft().PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def is_adapter(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged(model: nn.Module) -> HybridLM:
    """The base model with the adapter's products added into its weights (a plain ``HybridLM`` again)."""
    return model.merge_and_unload() if is_adapter(model) else model

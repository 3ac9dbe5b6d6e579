"""What a server serves under a public name: one model (``ServedModel``) or a composition of experts
(``ServedComposition``), and ``load_served_model`` reading either from a command-line spec.

A composition is one name to its callers. Each request is routed once (``CompositionOfExperts.choose``) on the
text the router was calibrated on (``chat_routing_text``), then answered by one expert, with that expert's tokenizer,
chat template and scheduler; the experts are not addressable by their own names unless served as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridlm.chat_template import ChatFormatError, ChatTemplate, message_text
from hybridlm.coe import CompositionOfExperts
from hybridlm.coe.composition import CONFIG_NAME as COE_CONFIG_NAME
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer


@dataclass
class ServedModel:
    """A model under its public name, with what serving it needs."""

    name: str
    model: HybridLM
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ServedComposition:
    """A composition of experts under one public name. ``experts``: each expert as a ``ServedModel`` named
    ``COMPOSITION/EXPERT`` (the name its scheduler and metrics carry; not a name callers can ask for)."""

    name: str
    coe: CompositionOfExperts
    created: int = field(default_factory=lambda: int(time.time()))
    experts: dict[str, ServedModel] = field(init=False)

    def __post_init__(self) -> None:
        self.experts = {name: ServedModel(f"{self.name}/{name}", e.model, e.chat_template, e.tokenizer, self.created)
                        for name, e in self.coe.experts.items()}

    def card(self) -> dict[str, Any]:
        """What ``/v1/models`` says of the composition beyond its name: its experts, router and fallback."""
        return {"experts": {name: {"layers": s.model.config.layers} for name, s in self.experts.items()},
                "router": self.coe.router.kind, "embedder": self.coe.embedder, "fallback": self.coe.fallback,
                "threshold": self.coe.threshold}


def chat_routing_text(messages: Any) -> str:
    """The text the router sees of a chat request: the content of its last user message (the turn being
    answered; all messages' content joined when none is a user's). A completion request is routed on its prompt,
    as ``coe eval`` routes a calibration prompt. Not the rendered chat prompt: that depends on the answering
    expert's own template, unknown until routed, and its markup is not in the text the router was calibrated on.
    Raises ``ChatFormatError`` for a message list no template could render."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list of {role, content} objects")
    parts = [message_text(m, i) for i, m in enumerate(messages)]
    users = [content for role, content in parts if role == "user"]
    return users[-1] if users else "\n".join(content for _, content in parts)


def is_composition(path: Path) -> bool:
    """True when ``path`` is a CoE directory (``hybridlm coe build`` wrote it)."""
    return (path / COE_CONFIG_NAME).is_file()


def load_served_model(spec: str, seed: int = 0) -> ServedModel | ServedComposition:
    """``MODEL`` or ``NAME=MODEL``; MODEL is a checkpoint directory or a CoE directory (either served under its
    directory name) or a preset name (randomly initialised from ``seed``: for trying the server, the text is
    noise)."""
    import torch

    from hybridlm.config import ModelConfig
    from hybridlm.presets import DESCRIBE_ONLY
    from hybridlm.tokenizer import load_tokenizer

    name, _, source = spec.rpartition("=")
    path = Path(source)
    if path.is_dir() and is_composition(path):
        return ServedComposition(name or path.resolve().name, CompositionOfExperts.from_pretrained(path))
    if path.is_dir():
        model = HybridLM.from_pretrained(path)
        tokenizer_file = path / "tokenizer.json"
        tokenizer = load_tokenizer(tokenizer_file if tokenizer_file.is_file() else None)
        return ServedModel(name or path.resolve().name, model.eval(), ChatTemplate.for_checkpoint(path), tokenizer)
    if source in DESCRIBE_ONLY:
        raise ValueError(f"MODEL {source}: a describe-only preset (too large to instantiate); serve a checkpoint "
                         f"directory or a small preset")
    config = ModelConfig.preset(source)  # raises naming the known presets
    torch.manual_seed(seed)
    return ServedModel(name or source, HybridLM(config).eval())

"""A composition of experts loaded from its directory: route a prompt, then run only the chosen expert.

A CoE directory holds ``coe.json`` (the experts by name, path and sha256 content hash; the embedder; the
fallback and its threshold), ``router.json`` + ``router.safetensors`` (see ``router``), and, when built with
``--copy``, the experts themselves under ``experts/NAME``. Loading checks each expert's hash first: a missing or
changed expert is refused, naming the expert and its path, since a router trained for one model says nothing
about another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.chat_template import ChatTemplate
from hybridlm.coe.features import Featurizer
from hybridlm.coe.router import Router
from hybridlm.model import HybridLM
from hybridlm.tokenizer import load_tokenizer
from hybridlm.train.checkpoint import sha256_file

CONFIG_NAME = "coe.json"
FORMAT = "hybridlm-coe"
FORMAT_VERSION = 1


class CoEError(ValueError):
    """A CoE directory, expert or argument that cannot be used; the message names which and why."""


def directory_sha256(path: str | Path) -> str:
    """The content hash of a checkpoint directory: sha256 over each file's relative path and sha256, sorted (a
    renamed, added, removed or altered file changes it; timestamps do not)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


@dataclass
class Expert:
    """One whole model of the composition, with what a server needs to run it on its own."""

    name: str
    path: Path
    sha256: str
    model: HybridLM
    tokenizer: Any  # ByteTokenizer | HFTokenizer: each expert tokenizes its own prompt
    chat_template: ChatTemplate


@dataclass(frozen=True)
class Routing:
    """Which expert answers one prompt, and why: the router's choice, its confidence, and whether the fallback
    took over (confidence below the threshold)."""

    expert: str  # the answering expert
    routed_expert: str  # the router's own choice
    confidence: float
    fell_back: bool


@dataclass
class Generation:
    """What ``CompositionOfExperts.generate`` answers: who answered, and what."""

    expert: str  # the expert that answered (the fallback when the router's confidence was below the threshold)
    routed_expert: str  # the router's own choice
    confidence: float
    fell_back: bool
    text: str
    token_ids: list[int] = field(default_factory=list)  # the new tokens, in the answering expert's vocabulary


def expert_path(coe_dir: Path, entry: dict[str, Any]) -> Path:
    """An expert's directory: relative paths (copied experts) are inside the CoE directory."""
    path = Path(entry["path"])
    return path if path.is_absolute() else coe_dir / path


def verify_expert(name: str, path: Path, expected: str) -> None:
    """Refuse a missing or changed expert, naming it and its path."""
    if not path.is_dir():
        raise CoEError(f"expert {name!r}: its checkpoint {path} is missing (the CoE was built with it there)")
    actual = directory_sha256(path)
    if actual != expected:
        raise CoEError(f"expert {name!r}: the checkpoint at {path} has changed since the CoE was built (sha256 "
                       f"{actual[:12]}..., recorded {expected[:12]}...); rebuild the CoE or restore the expert")


class CompositionOfExperts:
    """Experts, a router and an optional fallback. ``route`` picks the answering expert of each prompt;
    ``generate`` runs only that one. ``experts[name].model/.tokenizer/.chat_template`` expose each expert so a
    server can hold one scheduler per expert."""

    def __init__(self, experts: dict[str, Expert], router: Router, embedder: str | None = None,
                 fallback: str | None = None, threshold: float = 0.0, path: Path | None = None) -> None:
        if list(experts) != router.expert_names:
            raise CoEError(f"router: trained for experts {router.expert_names}, got {list(experts)}")
        if fallback is not None and fallback not in experts:
            raise CoEError(f"fallback: unknown expert {fallback!r}; expected one of {', '.join(experts)}")
        if embedder is not None and embedder not in experts:
            raise CoEError(f"embedder: unknown expert {embedder!r}; expected one of {', '.join(experts)}")
        self.experts = experts
        self.router = router
        self.embedder = embedder
        self.fallback = fallback
        self.threshold = float(threshold)
        self.path = path
        model = experts[embedder].model if embedder else None
        tokenizer = experts[embedder].tokenizer if embedder else None
        self.featurizer = Featurizer(router.features, model, tokenizer)

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> CompositionOfExperts:
        """Load a CoE directory written by ``build``; every expert's hash is checked before anything is loaded."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CoEError(f"coe: {path} is not a CoE directory (no {CONFIG_NAME}; `hybridlm coe build` writes one)")
        config = json.loads(config_file.read_text())
        if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
            raise CoEError(f"{config_file}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                           f"got {config.get('format')!r} version {config.get('version')!r}")
        entries = config["experts"]
        for entry in entries:
            verify_expert(entry["name"], expert_path(path, entry), entry["sha256"])
        experts = {}
        for entry in entries:
            where = expert_path(path, entry)
            model = HybridLM.from_pretrained(where, device=device, dtype=dtype).eval()
            experts[entry["name"]] = Expert(entry["name"], where, entry["sha256"], model, load_tokenizer(where),
                                            ChatTemplate.for_checkpoint(where))
        return cls(experts, Router.load(path), config.get("embedder"), config.get("fallback"),
                   config.get("threshold", 0.0), path)

    # ------------------------------------------------------------------------------------------ routing
    def route(self, prompts: list[str] | str, apply_fallback: bool = True) -> tuple[list[str], list[float]]:
        """Each prompt's answering expert and the router's confidence in its choice. With ``apply_fallback``
        (the default) a prompt whose confidence is below ``threshold`` goes to ``fallback``; without, the
        router's own choice is given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        indices, confidences = self.router.route(self.featurizer, prompts)
        names = [self.router.expert_names[i] for i in indices]
        if apply_fallback and self.fallback is not None:
            names = [self.fallback if c < self.threshold else n for n, c in zip(names, confidences, strict=True)]
        return names, confidences

    def choose(self, prompt: str) -> Routing:
        """The answering expert of one prompt: the router's choice, or the fallback below the threshold. The one
        place that rule is applied to a single prompt (``generate`` and the server both ask here)."""
        [routed], [confidence] = self.route([prompt], apply_fallback=False)
        fell_back = self.fallback is not None and confidence < self.threshold
        return Routing(self.fallback if fell_back else routed, routed, confidence, fell_back)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True) -> Generation:
        """Route ``prompt``, then generate with only the answering expert (tokenized by its own tokenizer, with
        its bos token first, as ``hybridlm generate`` and ``hybridlm serve`` do, so the three give the same text
        for the same seed); the result names that expert. Sampling arguments are ``hybridlm.generation.stream``'s."""
        if not isinstance(prompt, str) or not prompt:
            raise CoEError(f"prompt: expected a non-empty string, got {prompt!r}")
        routing = self.choose(prompt)
        expert = self.experts[routing.expert]
        ids = expert.tokenizer.encode(prompt, add_bos=True)
        device = expert.model.embedding.weight.device
        eos = getattr(expert.tokenizer, "eos_token_id", None) if stop_at_eos else None
        out = expert.model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos)
        new = out[0, len(ids):].tolist()
        return Generation(expert.name, routing.routed_expert, routing.confidence, routing.fell_back,
                          expert.tokenizer.decode(new), new)

"""ModelConfig: one dataclass that describes a Transformer, a Mamba-1/Mamba-2 model or a hybrid.

A model is a stack of blocks; block ``i`` is a *mixer* (letter ``layers[i]``) followed by an optional
feed-forward. The mixer pattern is an explicit string, one letter per layer:

    ``A`` attention · ``M`` Mamba-1 (selective scan) · ``S`` Mamba-2 (SSD)

The letters are registered by ``hybridlm.layers`` (imported with the package), each with its mixer kind, its label
and the check of the config fields it reads (``register_mixer``): this module imports no layer and no torch.

The feed-forward of each layer follows Jamba's period/offset rule: every layer gets ``ffn`` ("none" or
"mlp"), except that layer ``i`` gets a Mixture-of-Experts when ``moe_every > 0`` and
``i % moe_every == moe_offset``. ``ffn_pattern`` prints it: ``-`` none, ``F`` gated MLP, ``E`` MoE.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridlm.presets import PRESETS

FFN_KINDS = ("none", "mlp")


def invalid(name: str, expected: str, got: Any) -> ValueError:
    """The error for field ``name`` of a ModelConfig: what was expected, what was given."""
    return ValueError(f"ModelConfig.{name}: expected {expected}, got {got!r}")


def _fail(name: str, expected: str, got: Any) -> None:
    raise invalid(name, expected, got)


@dataclass(frozen=True)
class MixerLetter:
    """What a config needs to know of a mixer: its kind ("attention", "mamba", ...), its label for listings, and
    ``check(config, letter)``, which raises ``invalid(...)`` for a config the mixer cannot be built from as the mixer
    of ``letter`` (its own options are ``config.mixer_options.get(letter, {})``)."""

    kind: str
    label: str
    check: Callable[[ModelConfig, str], None]


MIXER_LETTERS: dict[str, MixerLetter] = {}  # filled by hybridlm.layers


def register_mixer(letter: str, kind: str, label: str, check: Callable[[ModelConfig, str], None]) -> None:
    """Make ``letter`` valid in ``ModelConfig.layers`` (``hybridlm.layers.MIXERS`` calls this for each mixer)."""
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isupper()):
        raise ValueError(f"letter: expected one upper-case letter, got {letter!r}")
    MIXER_LETTERS[letter] = MixerLetter(kind, label, check)


@dataclass
class ModelConfig:
    """Every hyperparameter of a hybridlm model. See the module docstring for the layer pattern."""

    vocab_size: int = 259  # tokens the tokenizer produces (byte-level default: 256 bytes + 3 specials)
    d_model: int = 256
    n_layers: int = 4
    # One letter per layer; a shorter pattern is tiled to n_layers ("MMMMAMMM" -> Jamba's 1:7).
    layers: str = "A"
    ffn: str = "mlp"
    moe_every: int = 0  # 0: no MoE layers
    moe_offset: int = 0
    d_ff: int | None = None  # gated-MLP / expert hidden size; None -> 8/3 d_model rounded up to 64

    # Attention
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (multi-head); fewer -> grouped-query attention
    head_dim: int | None = None  # None -> d_model // n_heads
    rope_theta: float | None = 10000.0  # None -> no positional encoding (Jamba's attention layers)
    attn_bias: bool = False
    # Local causal attention (Mistral): a query at position i sees keys j with i - j < sliding_window (itself and
    # the sliding_window - 1 before it), as transformers' Mistral does; the KV cache holds that many positions.
    # None -> the whole context
    sliding_window: int | None = None

    # Mamba-1 (Gu & Dao 2023, arXiv 2312.00752; defaults follow mamba_ssm's Mamba module)
    d_state: int = 16
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    mamba_inner_norms: bool = False  # RMSNorm on dt, B, C inside the mixer (Jamba)

    # Mamba-2 (Dao & Gu 2024, arXiv 2405.21060; defaults follow mamba_ssm's Mamba2 module)
    mamba2_d_state: int = 128
    mamba2_headdim: int = 64
    mamba2_ngroups: int = 1
    mamba2_chunk_size: int = 256

    # Shared by both SSM mixers
    d_conv: int = 4
    expand: int = 2
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    proj_bias: bool = False

    # Mixture of Experts
    n_experts: int = 8
    top_k: int = 2
    moe_normalize_topk: bool = True  # Mixtral renormalises the chosen weights; Jamba does not
    moe_aux_loss_coef: float = 0.01

    # Model
    # Options of mixers that are theirs alone, by pattern letter, e.g. {"L": {"feature_map": "elu1"}}: each mixer
    # reads and checks its own (the shared fields above are everyone's)
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    initializer_range: float = 0.02
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and 0 < len(self.layers) < self.n_layers:
            if self.n_layers % len(self.layers):
                _fail("layers", f"a pattern whose length divides n_layers={self.n_layers}", self.layers)
            self.layers = self.layers * (self.n_layers // len(self.layers))
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    # ----------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, what was expected and what was given."""
        positive = ["vocab_size", "d_model", "n_layers", "d_ff", "n_heads", "n_kv_heads", "head_dim",
                    "d_state", "dt_rank", "mamba2_d_state", "mamba2_headdim", "mamba2_ngroups",
                    "mamba2_chunk_size", "d_conv", "expand", "n_experts", "top_k",
                    "pad_vocab_size_multiple"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, "a positive integer", value)
        for name in ["norm_eps", "dt_min", "dt_max", "dt_init_floor", "initializer_range"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                _fail(name, "a positive number", value)
        if (not isinstance(self.moe_aux_loss_coef, (int, float)) or isinstance(self.moe_aux_loss_coef, bool)
                or not self.moe_aux_loss_coef >= 0):
            _fail("moe_aux_loss_coef", "a number >= 0", self.moe_aux_loss_coef)
        if self.rope_theta is not None and not (
            isinstance(self.rope_theta, (int, float)) and not isinstance(self.rope_theta, bool)
            and self.rope_theta > 0
        ):
            _fail("rope_theta", "a positive number or None", self.rope_theta)
        for name in ["attn_bias", "mamba_inner_norms", "conv_bias", "proj_bias", "moe_normalize_topk",
                     "tie_embeddings"]:
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if not isinstance(self.name, str) or not self.name:
            _fail("name", "a non-empty string", self.name)
        if not isinstance(self.layers, str) or len(self.layers) != self.n_layers:
            _fail("layers", f"a string of {self.n_layers} letters (n_layers) or a pattern that tiles it",
                  self.layers)
        if set(self.layers) - set(MIXER_LETTERS):
            letters = ", ".join(f"{k} {v.kind}" for k, v in MIXER_LETTERS.items())
            _fail("layers", f"letters from: {letters}", self.layers)
        if self.ffn not in FFN_KINDS:
            _fail("ffn", f"one of {FFN_KINDS}", self.ffn)
        if not isinstance(self.moe_every, int) or isinstance(self.moe_every, bool) or self.moe_every < 0:
            _fail("moe_every", "an integer >= 0 (0 disables MoE)", self.moe_every)
        if not isinstance(self.moe_offset, int) or isinstance(self.moe_offset, bool) or self.moe_offset < 0:
            _fail("moe_offset", "an integer >= 0", self.moe_offset)
        if self.moe_every and not self.moe_offset < self.moe_every:
            _fail("moe_offset", f"an integer in [0, moe_every={self.moe_every})", self.moe_offset)
        if self.top_k > self.n_experts:
            _fail("top_k", f"at most n_experts={self.n_experts}", self.top_k)
        if (not isinstance(self.mixer_options, dict) or set(self.mixer_options) - set(self.layers)
                or not all(isinstance(v, dict) for v in self.mixer_options.values())):
            _fail("mixer_options", "options of the mixers in layers, a dict of dicts by letter", self.mixer_options)
        for letter in dict.fromkeys(self.layers):  # each mixer checks the fields it reads
            MIXER_LETTERS[letter].check(self, letter)
        if not self.dt_min <= self.dt_max:
            _fail("dt_max", f"a value >= dt_min={self.dt_min}", self.dt_max)

    # -------------------------------------------------------------------------------- derived values
    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of pad_vocab_size_multiple."""
        m = self.pad_vocab_size_multiple
        return m * math.ceil(self.vocab_size / m)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def ffn_kind(self, i: int) -> str:
        """Feed-forward of layer ``i``: "none", "mlp" or "moe"."""
        if self.moe_every and i % self.moe_every == self.moe_offset:
            return "moe"
        return self.ffn

    @property
    def ffn_pattern(self) -> str:
        return "".join({"none": "-", "mlp": "F", "moe": "E"}[self.ffn_kind(i)] for i in range(self.n_layers))

    @property
    def family(self) -> str:
        """"transformer", "mamba", "mamba2" or "hybrid" (more than one mixer kind)."""
        kinds = {MIXER_LETTERS[letter].kind for letter in self.layers}
        if len(kinds) > 1:
            return "hybrid"
        kind = kinds.pop()
        return "transformer" if kind == "attention" else kind

    def summary(self) -> str:
        """One printable line with the model's shape, e.g. for logs and reports."""
        return (f"{self.name}: {self.family}, d_model {self.d_model}, {self.n_layers} layers, "
                f"mixers {self.layers}, ffn {self.ffn_pattern}")

    # ---------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> ModelConfig:
        """Load from a JSON string or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            text = path.read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset (``hybridlm presets`` lists them)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(name=name, **copy.deepcopy(PRESETS[name]))  # a config never shares the preset's dicts

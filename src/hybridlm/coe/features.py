"""What the router sees of a prompt: an embedding from a language model, or hashed character n-grams.

Two kinds of feature, each L2-normalised so that a dot product is a cosine:

- ``embedding``: the mean over positions of the embedding model's final hidden states (after its last norm),
  the prompt tokenized by that model's own tokenizer. Samba-CoE routes on an embedding model's output; here the
  embedder is one of the experts (``--embedder NAME``), so it costs no extra model.
- ``ngram``: character 2- to 4-grams (configurable) hashed (crc32, stable across processes, unlike ``hash``)
  into 2**k buckets, counted (log 1+count), then L2-normalised. It needs no model and takes a prompt of any
  length, so it is the fallback for prompts the embedder cannot take: when no embedder is configured, or when
  the prompt is longer than ``max_embed_tokens`` in the embedder's tokens (its cost grows with the prompt;
  n-grams stay cheap).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hybridlm.model import HybridLM


@dataclass(frozen=True)
class FeatureConfig:
    """How prompts become router features; saved in the router's JSON."""

    # 2- to 4-grams: single characters (spaces, vowels) are shared by every domain; on the tests' toy code/prose
    # split the within/across-domain cosine ratio is 3x with 2-4-grams against 1.3x with 1-4-grams.
    ngram_min: int = 2
    ngram_max: int = 4
    ngram_buckets_log2: int = 12  # 4096 buckets: few collisions for short prompts, a 16 KiB vector
    max_embed_tokens: int = 512  # longer prompts (in the embedder's tokens) are routed on n-grams

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min/ngram_max: expected 1 <= min <= max, got {self.ngram_min}, {self.ngram_max}")
        if not 4 <= self.ngram_buckets_log2 <= 24:
            raise ValueError(f"ngram_buckets_log2: expected 4..24, got {self.ngram_buckets_log2}")
        if self.max_embed_tokens < 1:
            raise ValueError(f"max_embed_tokens: expected >= 1, got {self.max_embed_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        return cls(**data)


def ngram_features(prompts: list[str], config: FeatureConfig) -> torch.Tensor:
    # prompts: b strings -> (b, 2**ngram_buckets_log2) float32, each row of unit L2 norm (zero for an empty prompt)
    buckets = 1 << config.ngram_buckets_log2
    out = torch.zeros(len(prompts), buckets)
    for row, prompt in enumerate(prompts):
        data = prompt.encode("utf-8")
        ids = [zlib.crc32(data[i:i + n]) & (buckets - 1)
               for n in range(config.ngram_min, config.ngram_max + 1) for i in range(len(data) - n + 1)]
        if ids:
            out[row].index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
    # Sublinear counts (log 1+c): a prompt's many spaces and common letters would otherwise outweigh the rarer
    # longer n-grams that tell domains apart.
    return F.normalize(out.log1p(), dim=-1)


@torch.no_grad()
def mean_hidden_state(model: HybridLM, input_ids: list[int]) -> torch.Tensor:
    # input_ids: l token ids -> (d_model,) float32: the mean over positions of the final (normed) hidden states
    if not input_ids:
        raise ValueError("mean_hidden_state: the prompt has no tokens")
    captured: list[torch.Tensor] = []
    # The final hidden states are the input of the head: a hook on the last norm takes them without a copy of
    # the model's forward; logits_to_keep=1 keeps the head's work to one position.
    handle = model.norm_f.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        device = model.embedding.weight.device
        model(torch.tensor([input_ids], device=device), logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0][0].float().mean(0).cpu()


class Featurizer:
    """Features of prompts for a router: ``embed`` (when an embedder is given) and ``ngrams``."""

    def __init__(self, config: FeatureConfig, embedder: HybridLM | None = None, tokenizer: Any = None) -> None:
        if (embedder is None) != (tokenizer is None):
            raise ValueError("Featurizer: an embedder needs its tokenizer (give both or neither)")
        self.config = config
        self.embedder = embedder
        self.tokenizer = tokenizer

    def ngrams(self, prompts: list[str]) -> torch.Tensor:
        # prompts: b strings -> (b, 2**k)
        return ngram_features(prompts, self.config)

    def embed(self, prompts: list[str]) -> tuple[torch.Tensor | None, list[bool]]:
        # prompts: b strings -> ((b, d_model) unit rows, zero where not embeddable; which prompts were embedded)
        if self.embedder is None:
            return None, [False] * len(prompts)
        self.embedder.eval()
        rows, ok = [], []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt)
            fits = 0 < len(ids) <= self.config.max_embed_tokens
            ok.append(fits)
            rows.append(mean_hidden_state(self.embedder, ids) if fits
                        else torch.zeros(self.embedder.config.d_model))
        return F.normalize(torch.stack(rows), dim=-1), ok

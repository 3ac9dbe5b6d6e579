"""The router: one classifier head per feature kind, picking an expert and a confidence for each prompt.

Heads (``kind``):

- ``knn``: the labelled calibration features themselves; a prompt's k nearest by cosine vote, each vote weighted
  by its similarity (clamped at 0, plus a small floor so that orthogonal neighbours still count). The answer is
  the label with the most weight, its confidence that weight over the k neighbours' total (a weighted vote
  share in [1/k .. 1]). This is Samba-CoE's published router shape.
- ``logistic``: a softmax linear head ``W f + b`` trained on the calibration features with full-batch L-BFGS from
  a fixed seed (deterministic), with a small L2 penalty so separable data gives finite weights. Confidence is
  the softmax probability of the argmax.

A router holds an ``ngram`` head always (any prompt has n-grams) and an ``embedding`` head when it has an
embedder; a prompt goes to the embedding head when the embedder takes it, else to the n-gram head. Weights live
in ``router.safetensors``, everything else in ``router.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybridlm.coe.features import FeatureConfig, Featurizer

ROUTER_KINDS = ("knn", "logistic")
CONFIG_NAME = "router.json"
WEIGHTS_NAME = "router.safetensors"
FEATURE_KINDS = ("embedding", "ngram")
KNN_WEIGHT_FLOOR = 1e-3  # a neighbour with cosine <= 0 still casts this much of a vote


def check_router_kind(kind: str) -> None:
    if kind not in ROUTER_KINDS:
        raise ValueError(f"--router: unknown router kind {kind!r}; expected one of {', '.join(ROUTER_KINDS)}")


@dataclass
class Head:
    """One classifier over one feature kind. ``knn``: ``keys`` (n, d) unit rows, ``labels`` (n,) long;
    ``logistic``: ``weight`` (n_experts, d), ``bias`` (n_experts,)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    k: int = 5

    def predict(self, features: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        # features: (b, d) unit rows -> (expert index (b,) long, confidence (b,) float32)
        if self.kind == "logistic":
            probs = (features @ self.tensors["weight"].T + self.tensors["bias"]).softmax(-1)
            confidence, index = probs.max(-1)
            return index, confidence
        keys, labels = self.tensors["keys"], self.tensors["labels"]
        k = min(self.k, keys.shape[0])
        sims, nearest = (features @ keys.T).topk(k, dim=-1)  # (b, k); topk is deterministic for a given input
        weights = sims.clamp_min(0) + KNN_WEIGHT_FLOOR
        votes = torch.zeros(features.shape[0], n_experts).scatter_add_(1, labels[nearest], weights)  # (b, n_experts)
        best, index = votes.max(-1)
        return index, best / votes.sum(-1)


def fit_knn(features: torch.Tensor, labels: torch.Tensor, k: int) -> Head:
    # features: (n, d) unit rows, labels: (n,) long -> a head holding them
    return Head("knn", {"keys": features.contiguous().float(), "labels": labels.long().contiguous()}, k)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, n_experts: int, l2: float = 1e-3,
                 steps: int = 200, seed: int = 0) -> Head:
    # features: (n, d), labels: (n,) long -> a softmax linear head (n_experts, d) + (n_experts,)
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_experts, features.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(n_experts, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)
    x, y = features.float(), labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Head("logistic", {"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()})


class Router:
    """Expert names, the feature config and the heads; ``route`` gives each prompt an expert and a confidence."""

    def __init__(self, kind: str, expert_names: list[str], features: FeatureConfig, heads: dict[str, Head],
                 k: int = 5) -> None:
        check_router_kind(kind)
        if "ngram" not in heads:
            raise ValueError("router: needs an ngram head (the fallback for prompts the embedder cannot take)")
        self.kind, self.expert_names, self.features, self.heads, self.k = kind, list(expert_names), features, heads, k

    @classmethod
    def fit(cls, kind: str, expert_names: list[str], featurizer: Featurizer, prompts: list[str],
            labels: list[int], k: int = 5, seed: int = 0) -> Router:
        """Train a router of ``kind`` on ``prompts`` labelled with expert indices."""
        check_router_kind(kind)
        if not prompts:
            raise ValueError("--data: no calibration prompts to fit the router on")
        if k < 1:
            raise ValueError(f"--k: expected an integer >= 1, got {k}")
        y = torch.tensor(labels, dtype=torch.long)

        def fit_head(x: torch.Tensor, y: torch.Tensor) -> Head:
            return fit_knn(x, y, k) if kind == "knn" else fit_logistic(x, y, len(expert_names), seed=seed)

        heads = {"ngram": fit_head(featurizer.ngrams(prompts), y)}
        embedded, ok = featurizer.embed(prompts)
        if embedded is not None and any(ok):
            keep = torch.tensor(ok)
            heads["embedding"] = fit_head(embedded[keep], y[keep])
        return cls(kind, expert_names, featurizer.config, heads, k)

    def route(self, featurizer: Featurizer, prompts: list[str]) -> tuple[list[int], list[float]]:
        """Each prompt's expert index and confidence (the embedding head where the prompt is embedded)."""
        if not prompts:
            return [], []
        n = len(self.expert_names)
        index, confidence = self.heads["ngram"].predict(featurizer.ngrams(prompts), n)
        if "embedding" in self.heads:
            embedded, ok = featurizer.embed(prompts)
            if embedded is not None and any(ok):
                keep = torch.tensor(ok)
                e_index, e_conf = self.heads["embedding"].predict(embedded[keep], n)
                index[keep], confidence[keep] = e_index, e_conf
        return index.tolist(), confidence.tolist()

    # ------------------------------------------------------------------------------------------ files
    def save(self, directory: Path) -> None:
        """``router.json`` and ``router.safetensors`` into ``directory`` (the caller makes it atomic)."""
        tensors = {f"{name}.{key}": t for name, head in self.heads.items() for key, t in head.tensors.items()}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        config = {"kind": self.kind, "k": self.k, "expert_names": self.expert_names,
                  "features": self.features.to_dict(), "heads": sorted(self.heads)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Router:
        config: dict[str, Any] = json.loads((directory / CONFIG_NAME).read_text())
        tensors = load_file(str(directory / WEIGHTS_NAME))
        heads = {}
        for name in config["heads"]:
            if name not in FEATURE_KINDS:
                raise ValueError(f"{directory / CONFIG_NAME}: unknown head {name!r}; expected {FEATURE_KINDS}")
            own = {key.split(".", 1)[1]: t for key, t in tensors.items() if key.split(".", 1)[0] == name}
            heads[name] = Head(config["kind"], own, config["k"])
        return cls(config["kind"], config["expert_names"], FeatureConfig.from_dict(config["features"]), heads,
                   config["k"])

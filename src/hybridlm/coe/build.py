"""Writing a CoE directory: experts by path and hash (or copied), the router trained on calibration prompts.

Labels come from the data: a record's ``expert`` when given, else the oracle's choice on its ``completion``
(every expert scores it; the lowest mean per-token loss wins). The directory is written under a temporary
name beside ``out`` and renamed onto it, so a reader never sees half a CoE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hybridlm.atomic_files import atomic_directory
from hybridlm.chat_template import ChatTemplate
from hybridlm.coe.composition import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    CoEError,
    Expert,
    directory_sha256,
)
from hybridlm.coe.features import FeatureConfig, Featurizer
from hybridlm.coe.oracle import Example, loss_table, oracle_labels, read_examples
from hybridlm.coe.router import Router, check_router_kind
from hybridlm.model import HybridLM
from hybridlm.tokenizer import load_tokenizer


def parse_expert_specs(specs: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> {name: dir}, in order; a bad spec, duplicate name or missing dir is an error."""
    experts: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise CoEError(f"--expert: expected NAME=DIR, got {spec!r}")
        if name in experts:
            raise CoEError(f"--expert: the name {name!r} is given twice")
        experts[name] = Path(directory)
    return experts


def check_experts(experts: dict[str, Path], embedder: str | None, fallback: str | None, threshold: float) -> None:
    if len(experts) < 2:
        raise CoEError(f"--expert: a composition needs at least 2 experts, got {len(experts)}")
    for name, directory in experts.items():
        if not (directory / "config.json").is_file():
            raise CoEError(f"--expert {name}={directory}: not a hybridlm checkpoint directory (no config.json)")
    for argument, value in (("--embedder", embedder), ("--fallback", fallback)):
        if value is not None and value not in experts:
            raise CoEError(f"{argument}: unknown expert {value!r}; expected one of {', '.join(experts)}")
    if not 0.0 <= threshold <= 1.0:
        raise CoEError(f"--threshold: expected a confidence in [0, 1], got {threshold}")
    if threshold > 0 and fallback is None:
        raise CoEError("--threshold: needs --fallback NAME (the expert that answers below it)")


def label_examples(examples: list[Example], names: list[str], loaded: dict[str, Expert]) -> list[int]:
    """Each example's expert index: its given label, or the oracle's on its completion."""
    labels: list[int | None] = []
    for example in examples:
        if example.expert is not None and example.expert not in names:
            raise CoEError(f"--data: {example.where}: unknown expert {example.expert!r}; "
                           f"expected one of {', '.join(names)}")
        labels.append(names.index(example.expert) if example.expert is not None else None)
    todo = [i for i, label in enumerate(labels) if label is None]
    if todo:
        losses = loss_table([(loaded[n].model, loaded[n].tokenizer) for n in names], [examples[i] for i in todo])
        for i, label in zip(todo, oracle_labels(losses), strict=True):
            labels[i] = label
    return [int(label) for label in labels]


def build(out: str | Path, experts: dict[str, str | Path], data: str | Path, router: str = "knn",
          embedder: str | None = None, k: int = 5, threshold: float = 0.0, fallback: str | None = None,
          copy: bool = False, features: FeatureConfig | None = None, seed: int = 0) -> Path:
    """Write a CoE directory at ``out`` and return its path.

    ``experts``: name -> checkpoint directory (in order). ``data``: JSONL of ``{"prompt", "expert"}`` or
    ``{"prompt", "completion"}`` records. ``router``: ``"knn"`` or ``"logistic"``; ``k``: the kNN's neighbours.
    ``embedder``: the expert whose mean final hidden state is the router's feature (None: n-grams only).
    ``threshold``/``fallback``: below that confidence the fallback expert answers. ``copy``: copy the experts
    into the directory (then it can be moved as one).
    """
    check_router_kind(router)
    paths = {name: Path(p) for name, p in experts.items()}
    check_experts(paths, embedder, fallback, threshold)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CoEError(f"--k: expected an integer >= 1, got {k!r}")
    examples = read_examples(str(data))
    names = list(paths)
    hashes = {name: directory_sha256(p) for name, p in paths.items()}
    need_models = any(e.expert is None for e in examples)
    loaded: dict[str, Expert] = {}
    for name, p in paths.items():
        if need_models or name == embedder:
            loaded[name] = Expert(name, p, hashes[name], HybridLM.from_pretrained(p).eval(), load_tokenizer(p),
                                  ChatTemplate.for_checkpoint(p))
    labels = label_examples(examples, names, loaded)
    features = features or FeatureConfig()
    featurizer = Featurizer(features, loaded[embedder].model if embedder else None,
                            loaded[embedder].tokenizer if embedder else None)
    fitted = Router.fit(router, names, featurizer, [e.prompt for e in examples], labels, k=k, seed=seed)
    out = Path(out)
    with atomic_directory(out) as tmp:
        entries = []
        for name, p in paths.items():
            path = str(p.resolve())
            if copy:
                shutil.copytree(p, tmp / "experts" / name)
                path = f"experts/{name}"  # relative: the directory can be moved as a whole
            entries.append({"name": name, "path": path, "sha256": hashes[name]})
        fitted.save(tmp)
        config = {"format": FORMAT, "version": FORMAT_VERSION, "experts": entries, "embedder": embedder,
                  "fallback": fallback, "threshold": threshold, "router": router,
                  "calibration": {"data": str(Path(data).resolve()), "n": len(examples),
                                  "labels": {n: labels.count(i) for i, n in enumerate(names)}}}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


"""An end-to-end composition on one machine, offline: experts trained on distinct domains, routed, measured.

Three domains found on any Python install, each an expert of its own family trained with ``hybridlm.train``:

- ``code``: Python source of the standard library (``default_corpus_files``) without docstrings or comments,
  a Transformer (``llama-tiny``);
- ``prose``: English prose, the prose paragraphs of those modules' docstrings (read with ``ast``), a Mamba
  (``mamba-tiny``);
- ``arith``: a synthetic task, lines of integer sums ``"417+86=503;"``, a hybrid (``jamba-tiny``).

Held-out prompts come from files (or seeds) the experts never trained on; each record is a prompt and the text
that follows it, so the oracle is the expert with the lowest loss on that continuation. The router is a kNN over
the calibration prompts' hashed n-grams (no embedder: the tiny experts' hidden states are a poorer feature than
n-grams for telling these domains apart, and n-grams cost no model). ``DemoSettings.full()`` is the recorded
run; ``tiny()`` takes seconds, for the tests.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hybridlm.atomic_files import atomic_write_text
from hybridlm.coe.build import build
from hybridlm.coe.evaluation import evaluate_directory
from hybridlm.config import ModelConfig
from hybridlm.data.corpus import default_corpus_files
from hybridlm.train.launch import run_training

EXPERTS = {"code": "llama-tiny", "prose": "mamba-tiny", "arith": "jamba-tiny"}


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    n_calibration: int = 100  # prompts per domain
    n_heldout: int = 60  # prompts per domain
    prompt_chars: int = 96
    completion_chars: int = 48
    max_train_chars: int = 2_000_000  # per domain
    k: int = 5
    gen_tokens: int = 64

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def tiny(cls) -> DemoSettings:
        return cls(steps=4, batch_size=4, seq_len=32, n_calibration=4, n_heldout=3, prompt_chars=24,
                   completion_chars=12, max_train_chars=20_000, k=3, gen_tokens=4)


def _parse(file: Path) -> ast.Module | None:
    try:
        return ast.parse(file.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return None


def _has_docstring(node: ast.AST) -> bool:
    body = getattr(node, "body", None)
    return (isinstance(body, list) and bool(body) and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str))


def _prose_paragraph(text: str) -> bool:
    # Docstrings hold doctests and signatures too: keep the paragraphs that read as English sentences.
    letters = sum(c.isalpha() or c.isspace() or c in ".,;:'-()" for c in text)
    return len(text) > 40 and ">>>" not in text and "::" not in text and letters >= 0.95 * len(text)


def _docstrings(file: Path) -> str:
    """The English of a module: the prose paragraphs of its docstrings, one per line."""
    tree = _parse(file)
    if tree is None:
        return ""
    paragraphs = []
    for node in (n for n in ast.walk(tree) if _has_docstring(n)):
        for paragraph in ast.get_docstring(node).split("\n\n"):
            text = " ".join(paragraph.split())
            if _prose_paragraph(text):
                paragraphs.append(text)
    return "\n".join(paragraphs)


def _code(file: Path) -> str:
    """A module's code without its docstrings and comments (``ast.unparse``): the prose is the other domain's,
    so the two domains do not overlap (docstrings inside code windows made code and prose near-ties)."""
    tree = _parse(file)
    if tree is None:
        return ""
    for node in ast.walk(tree):
        if _has_docstring(node):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _arithmetic(seed: int, n_chars: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        a, b = rng.randrange(1000), rng.randrange(1000)
        parts.append(f"{a}+{b}={a + b};")
        size += len(parts[-1])
    return " ".join(parts)


def domain_texts(settings: DemoSettings) -> dict[str, tuple[str, str]]:
    """Each domain's (training text, held-out text): stdlib files split by file (the last fifth held out)."""
    files = default_corpus_files()
    cut = len(files) * 4 // 5
    train_files, held_files = files[:cut], files[cut:]

    def read(fs: list[Path], fn) -> str:
        out, size = [], 0
        for f in fs:
            text = fn(f)
            out.append(text)
            size += len(text)
            if size >= settings.max_train_chars:
                break
        return "\n".join(out)[:settings.max_train_chars]

    return {"code": (read(train_files, _code), read(held_files, _code)),
            "prose": (read(train_files, _docstrings), read(held_files, _docstrings)),
            "arith": (_arithmetic(0, settings.max_train_chars), _arithmetic(1, settings.max_train_chars // 4))}


def sample_records(text: str, n: int, settings: DemoSettings, rng: random.Random) -> list[dict[str, str]]:
    """``n`` (prompt, completion) windows at random places of ``text``."""
    span = settings.prompt_chars + settings.completion_chars
    if len(text) < span + 1:
        raise ValueError(f"demo: a domain's text is too short ({len(text)} characters) for {span}-character records")
    records = []
    for _ in range(n):
        start = rng.randrange(len(text) - span)
        window = text[start:start + span]
        records.append({"prompt": window[:settings.prompt_chars], "completion": window[settings.prompt_chars:]})
    return records


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_demo(out: str | Path, settings: DemoSettings, progress: bool = True) -> dict[str, Any]:
    """Train the experts, build the CoE, evaluate it; print and return the figures (``demo.json`` in ``out``)."""
    out = Path(out)
    started = time.perf_counter()
    texts = domain_texts(settings)
    rng = random.Random(0)
    calibration, heldout = [], []
    train_times = {}
    for name, (train_text, held_text) in texts.items():
        data = out / "data" / f"{name}.txt"
        atomic_write_text(data, train_text)
        # Calibration prompts from the training text (a router's labelled set), held-out from unseen text.
        calibration += sample_records(train_text, settings.n_calibration, settings, rng)
        heldout += sample_records(held_text, settings.n_heldout, settings, rng)
        begin = time.perf_counter()
        run_training(out / "experts" / name, model=ModelConfig.preset(EXPERTS[name]), data=[str(data)],
                     settings={"steps": settings.steps, "batch_size": settings.batch_size, "seq_len": settings.seq_len,
                               "lr": settings.lr, "warmup_steps": max(1, settings.steps // 20),
                               "eval_every": 0, "log_every": max(1, settings.steps // 10)},
                     progress=progress)
        train_times[name] = time.perf_counter() - begin
        print(f"trained {name} ({EXPERTS[name]}) in {train_times[name]:.1f} s", file=sys.stderr)
    _write_jsonl(out / "calibration.jsonl", calibration)
    _write_jsonl(out / "heldout.jsonl", heldout)
    experts = {name: out / "experts" / name / "checkpoint" for name in texts}
    begin = time.perf_counter()
    coe_dir = build(out / "coe", experts, out / "calibration.jsonl", router="knn", k=settings.k)
    build_time = time.perf_counter() - begin
    begin = time.perf_counter()
    result, report = evaluate_directory(coe_dir, out / "heldout.jsonl", out=out, gen_tokens=settings.gen_tokens)
    summary = {"settings": asdict(settings), "experts": EXPERTS, "train_seconds": train_times,
               "build_seconds": build_time, "eval_seconds": time.perf_counter() - begin,
               "total_seconds": time.perf_counter() - started, "eval": result}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    print(report)
    verdict = "all floors hold" if all(result["floors"].values()) else "a floor FAILS"
    print(f"demo: {verdict}; {summary['total_seconds']:.0f} s in all; {out / 'demo.json'}")
    return summary

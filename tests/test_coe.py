"""Composition of experts: routers, oracle labels, the CoE directory (hashes, atomic build), generation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlm.coe import CoEError, CompositionOfExperts
from hybridlm.coe.build import build, parse_expert_specs
from hybridlm.coe.composition import directory_sha256
from hybridlm.coe.features import FeatureConfig, Featurizer, ngram_features
from hybridlm.coe.oracle import Example, completion_loss, loss_table, oracle_labels
from hybridlm.coe.router import Router
from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.tokenizer import HFTokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CODE = ["def f(x):\n    return x", "import os\nos.path.join(a, b)", "for i in range(10):\n    print(i)",
        "class A:\n    def __init__(self):", "if x is None:\n    return []", "lambda y: y + 1  # add",
        "try:\n    pass\nexcept ValueError:", "while True:\n    break"]
PROSE = ["The cat sat quietly on the warm mat.", "Rivers flow slowly toward the distant sea.",
         "She walked home under a sky of stars.", "Many people enjoy reading in the evening.",
         "The old house stood alone on the hill.", "Birds sang as the morning sun rose.",
         "He wrote a long letter to his friend.", "Children laughed in the green park."]


def save_model(path: Path, preset: str, seed: int, tokenizer=None) -> Path:
    torch.manual_seed(seed)
    HybridLM(ModelConfig.preset(preset)).save_pretrained(path, tokenizer=tokenizer)
    return path


def bpe_tokenizer(directory: Path) -> HFTokenizer:
    """A small byte-level BPE trained here on the toy prompts: a tokenizer unlike the byte one."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CODE + PROSE, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {"code": save_model(root / "code", "llama-tiny", 1), "prose": save_model(root / "prose", "mamba-tiny", 2)}


def labelled(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_labels(path: Path) -> Path:
    return labelled(path, [{"prompt": p, "expert": "code"} for p in CODE] +
                    [{"prompt": p, "expert": "prose"} for p in PROSE])


# ------------------------------------------------------------------------------------------------ features
def test_ngram_features_are_unit_stable_and_tell_domains_apart():
    config = FeatureConfig()
    a = ngram_features(CODE + PROSE, config)
    assert a.shape == (16, 1 << config.ngram_buckets_log2)
    assert torch.allclose(a.norm(dim=-1), torch.ones(16))
    assert torch.equal(a, ngram_features(CODE + PROSE, config))  # crc32, not the salted hash()
    sims = a @ a.T
    within = (sims[:8, :8].sum() + sims[8:, 8:].sum() - 16) / 112
    assert within > 2 * sims[:8, 8:].mean()  # code nearer code, prose nearer prose


def test_long_prompts_fall_back_to_ngrams(experts):
    model = HybridLM.from_pretrained(experts["code"])
    featurizer = Featurizer(FeatureConfig(max_embed_tokens=20), model, load_tokenizer(experts["code"]))
    embedded, ok = featurizer.embed(["short", "x" * 21])
    assert ok == [True, False] and embedded.shape == (2, model.config.d_model)
    assert math.isclose(float(embedded[0].norm()), 1.0, rel_tol=1e-5) and float(embedded[1].norm()) == 0


# ------------------------------------------------------------------------------------------------ routers
@pytest.mark.parametrize("kind", ["knn", "logistic"])
def test_routers_learn_a_separable_split_and_are_deterministic(kind):
    featurizer = Featurizer(FeatureConfig())
    train_prompts = CODE[:6] + PROSE[:6]
    labels = [0] * 6 + [1] * 6
    router = Router.fit(kind, ["code", "prose"], featurizer, train_prompts, labels, k=3)
    held_out = CODE[6:] + PROSE[6:]
    index, confidence = router.route(featurizer, held_out)
    assert index == [0, 0, 1, 1]
    assert all(0 < c <= 1 for c in confidence)
    again = Router.fit(kind, ["code", "prose"], featurizer, train_prompts, labels, k=3)
    assert again.route(featurizer, held_out) == (index, confidence)


def test_knn_confidence_is_the_weighted_vote_share():
    featurizer = Featurizer(FeatureConfig())
    router = Router.fit("knn", ["a", "b"], featurizer, CODE[:3] + PROSE[:1], [0, 0, 0, 1], k=4)
    _, [confidence] = router.route(featurizer, [CODE[3]])
    x = featurizer.ngrams([CODE[3]])[0]
    sims = (featurizer.ngrams(CODE[:3] + PROSE[:1]) @ x).clamp_min(0) + 1e-3
    assert math.isclose(confidence, float(sims[:3].sum() / sims.sum()), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ oracle
def test_oracle_labels_pick_the_lowest_loss_expert(experts):
    models = [(HybridLM.from_pretrained(p).eval(), load_tokenizer(p)) for p in experts.values()]
    examples = [Example(p, completion=" and more text") for p in CODE[:2] + PROSE[:2]]
    losses = loss_table(models, examples)
    for row, e in enumerate(examples):
        for col, (model, tok) in enumerate(models):
            prompt, completion = tok.encode(e.prompt), tok.encode(e.completion)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion])).logits[0, :, :model.config.vocab_size]
            want = F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(completion))
            assert math.isclose(float(losses[row, col]), float(want), rel_tol=1e-4)
    assert oracle_labels(losses) == [int(r.argmin()) for r in losses]
    assert oracle_labels(torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.7, 0.1]])) == [1, 2]


# ------------------------------------------------------------------------------------------------ directory
def test_build_then_load_routes_and_generates_with_only_the_chosen_expert(experts, tmp_path):
    out = build(tmp_path / "coe", experts, toy_labels(tmp_path / "d.jsonl"), router="knn", k=1,
                embedder="code")
    coe = CompositionOfExperts.from_pretrained(out)
    assert coe.expert_names == ["code", "prose"] and coe.embedder == "code"
    names, confidences = coe.route(CODE[:2] + PROSE[:2])
    assert names == ["code", "code", "prose", "prose"]  # calibration prompts: their own nearest neighbour
    assert coe.route(CODE[:2] + PROSE[:2]) == (names, confidences)
    calls = {name: 0 for name in coe.experts}
    for name, expert in coe.experts.items():
        expert.model.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    result = coe.generate(PROSE[0], 5, temperature=0)
    assert result.expert == "prose" and len(result.token_ids) <= 5
    assert calls["prose"] > 0 and calls["code"] == 1  # the embedder's one forward for routing, no generation
    ids = coe.experts["prose"].tokenizer.encode(PROSE[0], add_bos=True)  # bos + bytes, as generate and serve
    direct = coe.experts["prose"].model.generate(torch.tensor([ids]), 5, temperature=0)
    assert result.token_ids == direct[0, len(ids):].tolist()[:len(result.token_ids)]


def test_fallback_answers_below_the_threshold(experts, tmp_path):
    data = labelled(tmp_path / "d.jsonl", [{"prompt": p, "expert": "code"} for p in CODE[:4]] +
                    [{"prompt": p, "expert": "prose"} for p in PROSE[:4]])
    probes = CODE[4:] + PROSE[4:]
    base = CompositionOfExperts.from_pretrained(build(tmp_path / "a", experts, data, k=5))
    names, confidences = base.route(probes)
    assert min(confidences) < max(confidences)
    threshold = (min(confidences) + max(confidences)) / 2
    low = min(range(len(probes)), key=confidences.__getitem__)
    fallback = next(n for n in experts if n != names[low])  # so that falling back changes the answer
    coe = CompositionOfExperts.from_pretrained(build(tmp_path / "b", experts, data, k=5, threshold=threshold,
                                                     fallback=fallback))
    assert coe.fallback == fallback and coe.threshold == pytest.approx(threshold)
    answered, confs = coe.route(probes)
    assert confs == confidences
    assert answered == [(fallback if c < threshold else n) for n, c in zip(names, confidences, strict=True)]
    assert coe.route(probes, apply_fallback=False) == (names, confidences)
    result = coe.generate(probes[low], 2, temperature=0)
    assert result.fell_back and result.expert == fallback and result.routed_expert == names[low]
    top = max(range(len(probes)), key=confidences.__getitem__)
    assert not coe.generate(probes[top], 1, temperature=0).fell_back


def test_a_missing_or_changed_expert_is_refused(experts, tmp_path):
    import shutil

    copies = {name: Path(shutil.copytree(p, tmp_path / name)) for name, p in experts.items()}
    out = build(tmp_path / "coe", copies, toy_labels(tmp_path / "d.jsonl"))
    with open(copies["prose"] / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(CoEError, match=rf"expert 'prose'.*{copies['prose']}.*changed"):
        CompositionOfExperts.from_pretrained(out)
    shutil.rmtree(copies["prose"])
    with pytest.raises(CoEError, match=rf"expert 'prose'.*{copies['prose']}.*missing"):
        CompositionOfExperts.from_pretrained(out)


def test_copy_makes_a_movable_directory(experts, tmp_path):
    out = build(tmp_path / "coe", experts, toy_labels(tmp_path / "d.jsonl"), copy=True)
    moved = Path(os.replace(out, tmp_path / "moved") or tmp_path / "moved")
    coe = CompositionOfExperts.from_pretrained(moved)
    assert coe.experts["code"].path == moved / "experts" / "code"
    assert directory_sha256(moved / "experts" / "code") == directory_sha256(experts["code"])


def test_an_expert_with_its_own_tokenizer(experts, tmp_path):
    tok = bpe_tokenizer(tmp_path / "tok")
    assert tok.encode(CODE[0]) != list(CODE[0].encode())
    torch.manual_seed(3)
    config = ModelConfig.preset("llama-tiny")
    config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": tok.vocab_size})
    HybridLM(config).save_pretrained(tmp_path / "bpe", tokenizer=tok)
    mixed = {"code": experts["code"], "bpe": tmp_path / "bpe"}
    rows = [{"prompt": p, "completion": " x = 1\n"} for p in CODE[:3]] + [{"prompt": p, "expert": "bpe"}
                                                                        for p in PROSE[:3]]
    out = build(tmp_path / "coe", mixed, labelled(tmp_path / "d.jsonl", rows), embedder="bpe", k=1)
    coe = CompositionOfExperts.from_pretrained(out)
    assert isinstance(coe.experts["bpe"].tokenizer, HFTokenizer)
    assert coe.experts["code"].tokenizer.encode("ab") == [97, 98]
    # Each expert scores the completion in its own tokens.
    models = [(e.model, e.tokenizer) for e in coe.experts.values()]
    losses = loss_table(models, [Example(CODE[0], completion=" x = 1\n")])
    assert losses.shape == (1, 2) and torch.isfinite(losses).all()
    assert math.isclose(float(losses[0, 1]), completion_loss(*models[1], CODE[0], " x = 1\n"), rel_tol=1e-6)
    names, _ = coe.route(PROSE[:3])
    assert names == ["bpe"] * 3
    for prompt in (PROSE[0], CODE[0]):
        result = coe.generate(prompt, 3, temperature=0)
        answering = coe.experts[result.expert]
        ids = answering.tokenizer.encode(prompt, add_bos=True)
        direct = answering.model.generate(torch.tensor([ids]), 3, temperature=0)[0, len(ids):].tolist()
        assert result.token_ids == direct[:len(result.token_ids)]
        assert all(0 <= t < answering.model.config.vocab_size for t in result.token_ids)


def test_build_writes_atomically(experts, tmp_path, monkeypatch):
    data = toy_labels(tmp_path / "d.jsonl")
    out = build(tmp_path / "coe", experts, data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, directory):
        (directory / "router.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(Router, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        build(tmp_path / "coe", experts, data, router="logistic")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old CoE untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".coe")] == []  # no temporary left


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_argument(experts, tmp_path):
    data = toy_labels(tmp_path / "d.jsonl")
    with pytest.raises(CoEError, match="--expert: expected NAME=DIR, got 'nodir'"):
        parse_expert_specs(["nodir"])
    with pytest.raises(CoEError, match="--expert: the name 'a' is given twice"):
        parse_expert_specs(["a=x", "a=y"])
    with pytest.raises(CoEError, match="--fallback: unknown expert 'nope'"):
        build(tmp_path / "o", experts, data, fallback="nope")
    with pytest.raises(CoEError, match="--embedder: unknown expert 'nope'"):
        build(tmp_path / "o", experts, data, embedder="nope")
    with pytest.raises(ValueError, match="--router: unknown router kind 'forest'"):
        build(tmp_path / "o", experts, data, router="forest")
    with pytest.raises(CoEError, match="--threshold: needs --fallback"):
        build(tmp_path / "o", experts, data, threshold=0.5)
    with pytest.raises(CoEError, match=r"--expert x=.*not a hybridlm checkpoint"):
        build(tmp_path / "o", {**experts, "x": tmp_path}, data)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="--data: .*holds no records"):
        build(tmp_path / "o", experts, tmp_path / "empty.jsonl")
    bad = labelled(tmp_path / "bad.jsonl", [{"prompt": "hi", "expert": "chef"}])
    with pytest.raises(CoEError, match="--data: .*unknown expert 'chef'"):
        build(tmp_path / "o", experts, bad)
    with pytest.raises(CoEError, match="not a CoE directory"):
        CompositionOfExperts.from_pretrained(tmp_path)
    assert not (tmp_path / "o").exists()

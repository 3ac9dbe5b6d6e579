"""Training: it learns, it resumes exactly (also after Ctrl-C), accumulation and 2-process DDP match one
process with the whole batch, checkpoints hold no pickle, and bad input fails before anything is written."""

import json
import os
import signal
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_cli import run_cli
from weight_checks import assert_adam_weights_match

from hybridlm import HybridLM, ModelConfig
from hybridlm.data.source import TaskSource, TextSource
from hybridlm.data.tasks import get_task
from hybridlm.data.token_file import tokenize_corpus
from hybridlm.tokenizer import ByteTokenizer
from hybridlm.train import TrainConfig, train

TEXT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"  # ~20 KB of Python, on every machine


pytestmark = pytest.mark.usefixtures("one_thread")


def _text_source(seq_len=32, eval_fraction=0.1):
    return TextSource(tokenize_corpus(TEXT, ByteTokenizer()), seq_len, seed=0, eval_fraction=eval_fraction)


def _losses(history):
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def test_loss_falls_well_below_unigram_entropy(tmp_path):
    source = _text_source(seq_len=64)
    train_tokens = np.asarray(source.tokens[: source.n_train])
    p = np.bincount(train_tokens) / len(train_tokens)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats/token of the best context-free model
    config = TrainConfig(steps=200, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=10, eval_every=0,
                         log_every=50)
    result = train(ModelConfig.preset("llama-tiny"), config, source, tmp_path, progress=False)
    eval_loss = [r["eval_loss"] for r in result.history if "eval_loss" in r][-1]
    assert eval_loss < 0.8 * unigram, (eval_loss, unigram)  # held-out text, so this is context, not memory


class _Interrupting:
    """The same samples as ``source``, but a Ctrl-C arrives while step ``at`` is being computed."""

    def __init__(self, source, at):
        self.source, self.at, self.vocab_size = source, at, source.vocab_size

    def train_batch(self, step, start, count):
        if step == self.at and start == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return self.source.train_batch(step, start, count)

    def eval_batches(self, *args):
        return self.source.eval_batches(*args)

    def describe(self):
        return self.source.describe()


def test_ctrl_c_saves_and_resume_continues_the_same_loss_curve(tmp_path):
    # A hybrid with MoE (its aux loss is in the objective); Mamba-2 rather than Mamba-1 keeps it fast.
    model = ModelConfig(d_model=32, n_layers=2, layers="SA", moe_every=2, moe_offset=1, n_experts=4, top_k=2,
                        n_heads=2, d_ff=64, mamba2_d_state=8, mamba2_headdim=16, mamba2_chunk_size=8)
    config = TrainConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, log_every=1)
    source = _text_source()
    full = train(model, config, source, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(model, config, _Interrupting(source, at=4), tmp_path / "cut", progress=False)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5  # the step running at the Ctrl-C was finished, then saved
    resumed = train(model, config, source, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    assert _losses(resumed.history) == _losses(full.history)[5:]  # bit-identical next losses
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics if "loss" in m] == [loss for _, loss in _losses(full.history)]
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    names = sorted(p.name for p in (tmp_path / "cut" / "checkpoint").iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "trainer_state.json"]  # no pickle anywhere
    assert HybridLM.from_pretrained(tmp_path / "cut" / "checkpoint").config.layers == "SA"


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    model = ModelConfig.preset("llama-tiny")
    base = dict(steps=3, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=0, log_every=1)
    whole = train(model, TrainConfig(batch_size=8, **base), _text_source(), tmp_path / "a", progress=False)
    accum = train(model, TrainConfig(batch_size=4, grad_accum=2, **base), _text_source(), tmp_path / "b",
                  progress=False)
    np.testing.assert_allclose([l for _, l in _losses(accum.history)], [l for _, l in _losses(whole.history)],
                               rtol=1e-5)


def _cli_train(args, out, nproc=1):
    run_cli(["train", *args, "--out", str(out)], nproc)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], HybridLM.from_pretrained(out / "checkpoint")


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path):
    args = ["--preset", "llama-tiny", "--data", str(TEXT), "--steps", "4", "--seq-len", "32", "--lr", "3e-3",
            "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--no-progress"]
    ddp_losses, ddp_model = _cli_train([*args, "--batch-size", "4"], tmp_path / "ddp", nproc=2)
    one_losses, one_model = _cli_train([*args, "--batch-size", "8"], tmp_path / "one")
    assert len(ddp_losses) == 4
    np.testing.assert_allclose(ddp_losses, one_losses, rtol=1e-5)
    assert_adam_weights_match(ddp_model, one_model, lr=3e-3, steps=4)


def test_bf16_autocast_and_task_training(tmp_path):
    task = get_task("induction_heads")
    model = ModelConfig(vocab_size=16, d_model=32, n_layers=2, layers="SA", mamba2_d_state=8, mamba2_headdim=16,
                        mamba2_chunk_size=8, n_heads=2)
    result = train(model, TrainConfig(steps=2, batch_size=4, seq_len=40, bf16=True, log_every=1),
                   TaskSource(task, 40), tmp_path, progress=False)
    assert all(np.isfinite(loss) for _, loss in _losses(result.history))
    assert "eval_accuracy" in result.history[-1]


def test_bad_input_is_specific_and_overwrites_nothing(tmp_path):
    model = ModelConfig.preset("llama-tiny")
    config = TrainConfig(steps=2, batch_size=2, seq_len=32, log_every=1, eval_every=0)
    train(model, config, _text_source(), tmp_path / "run", progress=False)
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    other = ModelConfig.preset("mamba-tiny")
    with pytest.raises(ValueError, match=r"different configuration.*layers: checkpoint 'AA', now 'MM'"):
        train(other, config, _text_source(), tmp_path / "run", resume=tmp_path / "run", progress=False)
    changed = TrainConfig(steps=4, batch_size=2, seq_len=32, lr=5e-3)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.001, now 0.005"):
        train(model, changed, _text_source(), tmp_path / "run", resume=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        train(model, config, _text_source(), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="trainer_state.json not found"):
        train(model, config, _text_source(), tmp_path / "x", resume=tmp_path / "nothing", progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
    with pytest.raises(ValueError, match="beyond the model's vocab_size"):
        train(ModelConfig(vocab_size=100, d_model=32, n_layers=1), config, _text_source(), tmp_path / "y",
              progress=False)
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)

"""Training under fault: a checkpoint save that fails midway (a full disk) leaves the previous checkpoint whole and
resumable, and a checkpoint corrupted or truncated after it was saved is refused on resume, naming the file."""

import errno
import json
import sysconfig
from pathlib import Path

import pytest

from hybridlm import HybridLM, ModelConfig
from hybridlm.data.source import TextSource
from hybridlm.data.token_file import tokenize_corpus
from hybridlm.tokenizer import ByteTokenizer
from hybridlm.train import TrainConfig, train
from hybridlm.train import checkpoint as ckpt

TEXT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
MODEL = ModelConfig.preset("llama-tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


def _source():
    return TextSource(tokenize_corpus(TEXT, ByteTokenizer()), 32, seed=0, eval_fraction=0.1)


def _config(steps):
    return TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, log_every=1, eval_every=0)


def _snapshot(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_a_save_failing_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(MODEL, _config(2), _source(), run, progress=False)
    before = _snapshot(run / "checkpoint")
    real_save = ckpt.save_file

    def disk_full(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # part of the file reached the disk, then no space
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError) as failed:
        train(MODEL, _config(4), _source(), run, resume=run, progress=False)
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(run / "checkpoint") == before  # untouched, byte for byte
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no half-written directory left
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    resumed = train(MODEL, _config(4), _source(), run, resume=run, progress=False)  # the old one still resumes
    assert resumed.step == 4
    assert HybridLM.from_pretrained(run / "checkpoint").config.layers == MODEL.layers


def test_corrupted_or_truncated_checkpoints_are_refused_naming_the_file(tmp_path):
    run = tmp_path / "run"
    train(MODEL, _config(2), _source(), run, progress=False)
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert sorted(state["sha256"]) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                       "rng.safetensors"]
    pristine = _snapshot(run / "checkpoint")

    def damaged(name, change):
        for path, data in pristine.items():
            path.write_bytes(data)
        file = run / "checkpoint" / name
        file.write_bytes(change(file.read_bytes()))
        return file

    def flip_last_byte(data):
        return data[:-1] + bytes([data[-1] ^ 1])

    for name, change in [("model.safetensors", lambda d: d[: len(d) // 2]),
                         ("optimizer.safetensors", flip_last_byte), ("rng.safetensors", lambda d: d[:-8])]:
        file = damaged(name, change)
        with pytest.raises(ValueError, match=rf"{file}.* corrupted or truncated"):
            train(MODEL, _config(4), _source(), run, resume=run, progress=False)
    file = damaged("trainer_state.json", lambda d: d[: len(d) // 2])
    with pytest.raises(ValueError, match=rf"{file}.* corrupted or truncated"):
        train(MODEL, _config(4), _source(), run, resume=run, progress=False)
    (run / "checkpoint" / "trainer_state.json").write_bytes(pristine[run / "checkpoint" / "trainer_state.json"])
    (run / "checkpoint" / "rng.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rng.safetensors is missing"):
        train(MODEL, _config(4), _source(), run, resume=run, progress=False)

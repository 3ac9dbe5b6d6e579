"""`hybridlm compare --quick` and `hybridlm eval`: every output written, every family in the table."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridlm.cli import main
from hybridlm.compare import DEFAULT_FAMILIES, FAMILIES, LABELS, family_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_quick_writes_everything(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", "--quick", "--out", str(out), "--no-progress"])
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [f["family"] for f in results["families"]] == DEFAULT_FAMILIES
    report = (out / "report.md").read_text()
    for family in results["families"]:
        assert LABELS[family["family"]] in table and LABELS[family["family"]] in report
        assert set(family["accuracy"]) == {"32", "64"} and all(0 <= a <= 1 for a in family["accuracy"].values())
        assert family["train_tokens_per_s"] > 0 and family["parameters"] > 0
        assert all(s["prefill_s"] > 0 and s["decode_ms_per_token"] > 0 for s in family["speed"].values())
    bytes_at = {f["family"]: f["state_bytes"] for f in results["families"]}
    assert bytes_at["transformer"]["64"] == 2 * bytes_at["transformer"]["32"]  # the KV cache grows
    assert bytes_at["mamba"]["64"] == bytes_at["mamba"]["32"]  # the SSM state does not
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in report
    else:
        assert all((out / name).stat().st_size > 0 for name in results["plots"].values())
        assert len(results["plots"]) == 4


def test_isolated_compare_trains_families_at_once_and_gives_each_the_same_tokens(tmp_path):
    """The default path: families trained two at a time in their own processes, then measured one by one
    from their checkpoints; the Transformer takes 4x the batch for 1/4 of the steps."""
    from hybridlm.compare import CompareSettings, compare

    settings = CompareSettings.quick(families=["transformer", "mamba"], steps=8, isolate=True, workers=2)
    results = compare(settings, tmp_path / "cmp", progress=False)
    by_family = {f["family"]: f for f in results["families"]}
    assert list(by_family) == ["transformer", "mamba"]  # the table keeps the requested order
    t, m = by_family["transformer"], by_family["mamba"]
    assert (t["train_steps"], t["train_batch_size"]) == (2, 4 * settings.batch_size)
    assert (m["train_steps"], m["train_batch_size"]) == (8, settings.batch_size)
    assert t["train_steps"] * t["train_batch_size"] == m["train_steps"] * m["train_batch_size"]
    for f in (t, m):
        assert all(s["prefill_s"] > 0 and s["decode_ms_per_token"] > 0 for s in f["speed"].values())
        assert (tmp_path / "cmp" / "runs" / f["family"] / "checkpoint" / "model.safetensors").is_file()
    again = compare(settings, tmp_path / "cmp", progress=False)  # a second run into the same directory
    assert [f["family"] for f in again["families"]] == ["transformer", "mamba"]
    assert [p.name for p in (tmp_path / "cmp").iterdir() if p.name.startswith(".runs-")] == []
    with pytest.raises(ValueError, match="attention_batch_scale: expected an integer >= 1, got 0"):
        compare(CompareSettings.quick(attention_batch_scale=0), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="workers: expected an integer >= 1, got 0"):
        compare(CompareSettings.quick(workers=0), tmp_path / "bad", progress=False)


ORPHAN_SCRIPT = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from hybridlm.compare import _exit_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(1)
    os._exit(0)  # gone without shutting the pool down, as when killed
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to see the worker end")
def test_isolated_workers_end_when_compare_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the pool's worker outlived the process that started it"


def test_attention_batch_scale():
    """The attention families take 4x the batch for 1/4 of the steps unless --attention-batch-scale says
    otherwise; the others always the common batch."""
    from hybridlm.compare import CompareSettings

    assert [CompareSettings().batch_scale(f) for f in ("transformer", "sliding_window", "lsh", "mamba", "based")] \
        == [4, 4, 4, 1, 1]
    one = CompareSettings(task="mqar", attention_batch_scale=1)
    assert [one.batch_scale(f) for f in ("transformer", "lsh", "mamba2")] == [1, 1, 1]
    assert CompareSettings(attention_batch_scale=8).batch_scale("mamba2") == 1


def test_compare_sweeps_widths_for_the_recall_curve(tmp_path):
    """Zoology's setting in miniature: MQAR, every family at each width, a table of accuracy and state by width."""
    from hybridlm.compare import CompareSettings, compare

    settings = CompareSettings.quick(task="mqar", task_params={"n_pairs": 4, "vocab_size": 32}, widths=[16, 32],
                                     families=["transformer", "gla", "based", "lsh"], short_length=None,
                                     short_steps=0)
    results = compare(settings, tmp_path / "cmp", progress=False)
    runs = [(f["family"], f["d_model"]) for f in results["families"]]
    assert runs == [(f, w) for w in (16, 32) for f in ("transformer", "gla", "based", "lsh")]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert report.startswith("# hybridlm compare: mqar (n_pairs 4, vocab_size 32)\n")
    assert "## Recall vs width" in report and "d_model 16 | d_model 32" in report
    assert "d_model 16, 32, 2 layers" in report  # the widths trained, not the unused d_model
    by_run = {f["run"]: f for f in results["families"]}
    assert by_run["gla-d32"]["state_bytes"]["32"] == by_run["gla-d32"]["state_bytes"]["64"]  # fixed state
    assert by_run["gla-d32"]["state_bytes"]["32"] > by_run["gla-d16"]["state_bytes"]["32"]  # grows with width
    assert by_run["lsh-d32"]["state_bytes"]["64"] > by_run["lsh-d32"]["state_bytes"]["32"]  # its KV cache grows
    assert (tmp_path / "cmp" / "runs" / "based-d16" / "checkpoint" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"eval_lengths: task 'mqar' is scored on sequences of at least 32 tokens, "
                                         r"got \[16\]"):
        compare(CompareSettings.quick(task="mqar", task_params={"n_pairs": 8, "min_pairs": 2}, eval_lengths=[16, 32]),
                tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match=r"task 'mqar': unknown parameter\(s\) \['pairs'\]"):
        compare(CompareSettings.quick(task="mqar", task_params={"pairs": 4}), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="widths: expected positive integers"):
        compare(CompareSettings.quick(widths=[0]), tmp_path / "bad", progress=False)


def test_compare_sweeps_learning_rates_and_keeps_the_best(tmp_path):
    from hybridlm.compare import CompareSettings, compare

    settings = CompareSettings.quick(families=["transformer", "mamba2"], lrs=[1e-4, 3e-2], isolate=True, workers=2)
    results = compare(settings, tmp_path / "cmp", progress=False)
    assert [f["family"] for f in results["families"]] == ["transformer", "mamba2"]  # one result per family
    for f in results["families"]:
        assert set(f["lr_sweep"]) == {"0.0001", "0.03"}
        mean = sum(f["accuracy"].values()) / len(f["accuracy"])
        assert f["lr_sweep"][f"{f['lr']:g}"] == mean == max(f["lr_sweep"].values())
        for lr in ("0.0001", "0.03"):  # every rate was trained and kept
            assert (tmp_path / "cmp" / "runs" / f"{f['family']}-lr{lr}" / "checkpoint" / "model.safetensors").is_file()
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "the best of lr 0.0001, 0.03 per family" in report and "mean accuracy by lr" in report
    alone = compare(CompareSettings.quick(families=["mamba2"], lrs=[1e-4, 3e-2]), tmp_path / "one", progress=False)
    assert [(f["family"], set(f["lr_sweep"])) for f in alone["families"]] == [("mamba2", {"0.0001", "0.03"})]
    with pytest.raises(ValueError, match=r"lrs: expected learning rates in \(0, 1\), got \[0.001, 0\]"):
        CompareSettings(lrs=[1e-3, 0]).validate()


def test_best_runs_prefers_accuracy_then_loss():
    from hybridlm.compare import best_runs

    def run(family, d_model, lr, accuracy, loss):
        return {"family": family, "d_model": d_model, "lr": lr, "accuracy": {"64": accuracy, "128": accuracy},
                "final_train_loss": loss}

    chosen = best_runs([run("gla", 32, 1e-3, 0.5, 0.1), run("gla", 32, 3e-3, 0.9, 0.9), run("gla", 64, 1e-3, 1.0, 0.2),
                        run("gla", 64, 3e-3, 1.0, 0.1), run("based", 32, 1e-3, 0.2, 0.3)])
    assert [(r["family"], r["d_model"], r["lr"]) for r in chosen] == [("gla", 32, 3e-3), ("gla", 64, 3e-3),
                                                                       ("based", 32, 1e-3)]
    assert chosen[0]["lr_sweep"] == {"0.001": 0.5, "0.003": 0.9}


def test_heads_option_sets_every_attention_family_and_is_checked():
    from hybridlm.compare import CompareSettings

    assert family_config("transformer", 64, 2, 16).n_heads == 8  # head_dim 8 by default
    for family in ("transformer", "hybrid", "gla", "sliding_window"):
        assert family_config(family, 64, 2, 16, n_heads=1).n_heads == 1
    with pytest.raises(ValueError, match=r"n_heads: expected a positive divisor of every width \(d_model 48\), got 5"):
        CompareSettings(widths=[40, 48], n_heads=5).validate()


def test_short_length_matters_only_with_short_steps():
    from hybridlm.compare import CompareSettings

    # 32 pairs need 128 tokens: the default short_length (64) is fine when no step is short
    long_only = dict(task="mqar", task_params={"n_pairs": 32, "vocab_size": 256}, train_length=128,
                     eval_lengths=[128, 256])
    CompareSettings(**long_only, short_steps=0).validate()
    with pytest.raises(ValueError, match="needs sequences of at least 128 tokens, got 64"):
        CompareSettings(**long_only, short_steps=10).validate()


def test_families_are_matched_in_size():
    from hybridlm import HybridLM

    sizes = {f: HybridLM(family_config(f, 64, 2, 16)).num_parameters() for f in FAMILIES}
    assert max(sizes.values()) / min(sizes.values()) < 1.6, sizes


def test_eval_cli_task_and_perplexity(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--task", "induction_heads", "--config", _config(tmp_path), "--out", str(run), "--steps", "2",
          "--batch-size", "2", "--seq-len", "24", "--no-progress"])
    main(["eval", str(run), "--task", "induction_heads", "--lengths", "24,100", "--samples", "4"])
    out = capsys.readouterr().out
    assert "length      24" in out and "length     100" in out
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        main(["eval", str(run), "--task", "nope"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", "--preset", "llama-tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 40)
    byte_run = tmp_path / "bytes"
    main(["train", "--preset", "llama-tiny", "--data", str(text), "--out", str(byte_run), "--steps", "2",
          "--batch-size", "2", "--seq-len", "32", "--no-progress"])
    assert list((byte_run / "tokens").glob("tokens-*.bin"))  # the token file is cached beside the output
    main(["eval", str(byte_run), "--data", str(text), "--seq-len", "32"])
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seq_len: 5000 is longer than the data"):
        main(["train", "--preset", "llama-tiny", "--data", str(text), "--out", str(tmp_path / "z"),
              "--seq-len", "5000"])


def _config(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"vocab_size": 16, "d_model": 16, "n_layers": 1, "layers": "A", "n_heads": 2}))
    return str(path)

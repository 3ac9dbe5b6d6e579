"""``hybridlm bench --attention``: every method measured against the exact attention it approximates, on random and
on a trained model's q, k, v; the table, JSON and plot."""

import json

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.bench.attention import AttentionBenchSettings, format_report, methods, run, trained_inputs
from hybridlm.cli import main


def small_settings(**overrides) -> AttentionBenchSettings:
    base = dict(lengths=(48, 160), heads=2, head_dim=16, threads=1, repeats=1, sample_rows=8, window=64,
                performer_features=32, lsh_chunk=16, lsh_rounds=2, landmarks=8, skyformer_landmarks=16,
                inputs=("random",))
    return AttentionBenchSettings(**{**base, **overrides})


def test_every_method_is_measured_against_its_target_at_every_length():
    results = run(small_settings())
    runs = results["runs"]
    assert len(runs) == 2 * len(methods(small_settings(), 48))
    for r in runs:
        assert r["seconds"] > 0 and r["output_error"] >= 0 and r["row_error"] >= 0
    by = {(r["length"], r["method"].split(" ")[0]): r for r in runs}
    for length in (48, 160):  # exact attention is its own target; a window past the length is exact too
        assert by[length, "exact"]["output_error"] < 1e-6
        assert by[length, "exact"]["row_error"] < 1e-6
    assert by[48, "sliding"]["output_error"] < 1e-6  # a window of 64 over 48 tokens: every key in reach
    assert by[160, "sliding"]["output_error"] > 1e-3  # beyond the window it approximates
    for name in ("Performer", "LSH", "Nystromformer", "Skyformer"):
        assert 1e-4 < by[160, name]["output_error"] < 10, (name, by[160, name])
    report = format_report(results)
    assert "| 160 | LSH 2 rounds, 10 buckets, chunk 16 | shared-QK causal softmax |" in report


def test_trained_inputs_are_a_models_last_attention_layer_on_the_corpus(tmp_path):
    config = ModelConfig(vocab_size=259, d_model=32, n_layers=2, layers="MA", n_heads=2, n_kv_heads=1, head_dim=16)
    model = HybridLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    from hybridlm.tokenizer import load_tokenizer

    q, k, v = trained_inputs(model, load_tokenizer(None), 40, heads=2)
    assert q.shape == k.shape == v.shape == (1, 2, 40, 16)
    torch.testing.assert_close(k[:, 0], k[:, 1])  # the one KV head, shared by both query heads
    results = run(small_settings(inputs=("trained",), lengths=(40,), model=str(tmp_path / "model")))
    assert {r["inputs"] for r in results["runs"]} == {"trained"}


def test_a_model_without_attention_is_refused(tmp_path):
    HybridLM(ModelConfig.preset("mamba-tiny")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="--attention-model: .* has no attention layer"):
        run(small_settings(inputs=("trained",), model=str(tmp_path / "m")))


def test_the_cli_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "attention.json"
    main(["bench", "--attention", "--attention-lengths", "64", "--attention-inputs", "random", "--repeats", "1",
          "--threads", "1", "--json", str(path), "--plots", str(tmp_path / "plots")])
    assert "exact causal (SDPA)" in capsys.readouterr().out
    assert (tmp_path / "plots" / "attention_error_vs_time.png").stat().st_size > 1000
    records = json.loads(path.read_text())["runs"]
    assert {r["length"] for r in records} == {64}
    with pytest.raises(SystemExit, match="--attention-inputs: expected 'random' and/or 'trained', got 'real'"):
        main(["bench", "--attention", "--attention-inputs", "real", "--attention-lengths", "64"])

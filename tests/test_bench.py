"""`hybridlm bench` end to end on tiny shapes: measurements present, bounds sane, peers reported honestly."""

import json
import os

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.bench import BenchSettings, format_report, run
from hybridlm.bench.peer_process import measure_peer, weights_fingerprint
from hybridlm.bench.runner import decode_bytes, measure_subject, peak_rss_bytes, prefill_work
from hybridlm.bench.subjects import Ours, state_at_context
from hybridlm.cli import main


def tiny_settings(**kw):
    # The budget is a cap: these shapes take well under a second a point once compiled, but on a fresh clone numba
    # compiles every kernel inside the first points, and a 2-core CI machine spent over 15 s of a 20 s budget there.
    base = dict(presets=("mamba-tiny", "llama-tiny"), threads=1, prefill_lengths=(16, 32), decode_contexts=(8, 64),
                train_length=16, decode_tokens=2, repeats=1, budget_s=120, scan=False)
    return BenchSettings(**{**base, **kw})


def test_bench_measures_every_point_and_reports_missing_peer_as_not_measured(monkeypatch, tmp_path):
    # The peer's process finds a llama_cpp that fails to import: reported as not measured, never a pass.
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    threads = torch.get_num_threads()
    results = run(tiny_settings(peers=("llamacpp",)), log=lambda _: None)
    assert torch.get_num_threads() == threads  # the bench's thread count (1 here) does not outlive it
    json.dumps(results, default=str)
    for preset in ("mamba-tiny", "llama-tiny"):
        entry = results["presets"][preset]
        ours = entry["subjects"]["hybridlm"]
        assert set(ours["prefill"]) == {16, 32} and set(ours["decode"]) == {8, 64}
        assert all(v["tok_s"] > 0 for v in ours["prefill"].values())
        assert ours["train"]["tok_s"] > 0
        assert "llamacpp" in entry["not_measured"] and "llamacpp" not in entry["subjects"]
    # The KV cache grows with the context, the Mamba state does not.
    kv = results["presets"]["llama-tiny"]["limits"]["decode"]
    ssm = results["presets"]["mamba-tiny"]["limits"]["decode"]
    assert kv[64]["state_bytes"] == 8 * kv[8]["state_bytes"] > 0
    assert ssm[64]["state_bytes"] == ssm[8]["state_bytes"] > 0
    # Each preset's bounds use the machine as measured while that preset ran.
    for entry in results["presets"].values():
        rates = entry["machine"]
        assert rates["read_gbps"] > 0 and rates["gemm_gflops"] > 0 and rates["exp_gps"] > 0
        for lim in entry["limits"]["decode"].values():
            assert lim["bound_ms"] == pytest.approx(lim["bytes_token"] / (rates["read_gbps"] * 1e9) * 1e3)
    text = format_report(results)
    assert "## mamba-tiny" in text and "llamacpp: not measured" in text
    assert text.count("bounds from the machine as measured with this preset's rounds: streaming read") == 2
    assert "ImportError" in results["presets"]["mamba-tiny"]["not_measured"]["llamacpp"]


def test_peer_runs_in_its_own_process_on_the_same_weights():
    pytest.importorskip("transformers")
    results = run(tiny_settings(presets=("mamba-tiny",), peers=("hf",), decode_contexts=(8,)), log=lambda _: None)
    entry = results["presets"]["mamba-tiny"]
    assert entry["not_measured"] == {}
    hf = entry["subjects"]["hf"]
    assert set(hf["prefill"]) == {16, 32} and set(hf["decode"]) == {8} and hf["train"]["tok_s"] > 0
    # A child that rebuilt other weights refuses to measure.
    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    figures, why_not = measure_peer("hf", "mamba-tiny", [0.0], tiny_settings(), 64)
    assert figures is None and "different weights" in why_not
    assert len(weights_fingerprint(model)) == len(list(model.parameters()))


def test_a_crashed_peer_process_is_reported(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")
    figures, why_not = measure_peer("hf", "mamba-tiny", [], tiny_settings(), 64)
    assert figures is None and "exited with code 1" in why_not


def test_state_at_context_decodes_like_a_state_of_that_length():
    model = HybridLM(ModelConfig.preset("jamba-tiny")).eval()
    state = state_at_context(model, 40)
    assert state.seqlen == 40
    kv = [s for s in state.layers if hasattr(s, "k")]
    assert kv and all(s.length == 40 for s in kv)
    with torch.no_grad():
        logits = model(torch.tensor([[5]]), state=state).logits
    assert torch.isfinite(logits).all() and all(s.length == 41 for s in kv)


def test_physical_bounds_count_weights_state_and_flops():
    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    params = sum(p.numel() for p in model.parameters())
    assert decode_bytes(model, 1000) == params * 4 + 1000
    flops_short, exps = prefill_work(model, 16)
    flops_long, _ = prefill_work(model, 1024)
    c = model.config
    assert exps == c.n_layers * c.d_inner * c.d_state
    assert flops_long < flops_short  # the LM head is paid once per prompt, not per token
    assert peak_rss_bytes() is None or peak_rss_bytes() > 0


def test_peer_failure_is_recorded_not_raised():
    class Broken:
        name = "broken"
        train_step = None

        def prefill(self, ids):
            pass

        def decoder(self, context):
            raise MemoryError("no room")

    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    out = measure_subject(Broken(), model, tiny_settings(), is_ours=False)
    assert out["decode"] == {} and any("MemoryError" in s for s in out["skipped"])
    assert Ours(model).decoder(4) is not None


def test_bench_cli_validates_arguments():
    with pytest.raises(SystemExit, match="--peer: unknown 'nope'"):
        main(["bench", "--presets", "mamba-tiny", "--peer", "nope"])
    with pytest.raises(SystemExit, match="not a runnable preset"):
        main(["bench", "--presets", "llama2-7b"])
    with pytest.raises(SystemExit, match="--prefill: expected comma-separated positive integers"):
        main(["bench", "--presets", "mamba-tiny", "--prefill", "0,12"])
    with pytest.raises(SystemExit, match="--train-length: expected a token count >= 0"):
        main(["bench", "--presets", "mamba-tiny", "--train-length", "-1"])


def test_bench_train_length_zero_skips_the_training_step():
    results = run(tiny_settings(presets=("mamba2-tiny",), train_length=0, decode_contexts=(8,)), log=lambda _: None)
    ours = results["presets"]["mamba2-tiny"]["subjects"]["hybridlm"]
    assert ours["train"] is None and ours["prefill"] and ours["decode"]
    assert "forward+backward" not in format_report(results)


def test_bench_records_the_wait_policy_and_warns_when_spinning_would_starve_peers(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    logged = []
    results = run(tiny_settings(presets=(), peers=("hf",)), log=logged.append)
    assert results["omp_wait_policy"] == "ACTIVE"
    assert any("not comparable" in line for line in logged)
    assert "OMP_WAIT_POLICY ACTIVE" in format_report(results)


def test_rounds_alternate_subjects_and_report_the_median_per_point():
    from hybridlm.bench.runner import median_of_rounds

    def figures(prefill_s, ms, rss, skipped=()):
        return {"prefill": {16: {"tok_s": 16 / prefill_s, "seconds": prefill_s, "peak_rss": rss}},
                "decode": {8: {"ms_token": ms, "peak_rss": rss}}, "train": {"length": 16, "tok_s": 100 / prefill_s},
                "skipped": list(skipped)}

    merged = median_of_rounds([figures(1.0, 30.0, 5, ["decode 64"]), figures(3.0, 10.0, 7),
                               figures(2.0, 20.0, 6, ["decode 64: MemoryError"])])
    assert merged["rounds"] == 3
    assert merged["prefill"][16] == {"tok_s": 8.0, "seconds": 2.0, "peak_rss": 7}  # medians; the largest RSS
    assert merged["decode"][8]["ms_token"] == 20.0 and merged["train"] == {"length": 16, "tok_s": 50.0}
    assert merged["skipped"] == ["decode 64", "decode 64: MemoryError"]  # never measured: still reported
    measured_once = median_of_rounds([figures(1.0, 30.0, 5, ["decode 64"]),
                                      {**figures(1.0, 30.0, 5), "decode": {64: {"ms_token": 9.0, "peak_rss": 1}}}])
    assert measured_once["decode"][64]["ms_token"] == 9.0 and measured_once["skipped"] == []

    logged = []
    results = run(tiny_settings(presets=("mamba-tiny",), rounds=2, decode_contexts=(8,), train_length=0),
                  log=logged.append)
    assert [line for line in logged if "hybridlm" in line] == ["mamba-tiny: hybridlm ... (round 1/2)",
                                                               "mamba-tiny: hybridlm ... (round 2/2)"]
    assert results["presets"]["mamba-tiny"]["subjects"]["hybridlm"]["rounds"] == 2
    assert "median over 2 rounds" in format_report(results)
    with pytest.raises(SystemExit, match="--rounds"):
        main(["bench", "--presets", "mamba-tiny", "--rounds", "0"])


def test_bench_of_a_linear_attention_preset_times_its_chunked_and_quadratic_forms():
    results = run(tiny_settings(presets=("based-tiny",), decode_contexts=(8, 64)), log=lambda _: None)
    entry = results["presets"]["based-tiny"]
    assert entry["limits"]["decode"][64]["state_bytes"] == entry["limits"]["decode"][8]["state_bytes"] > 0
    forms = entry["linear_attention_forms"]
    assert set(forms) == {16, 32}
    assert all(f["chunked_ms"] > 0 and f["quadratic_ms"] > 0 and f["quadratic_over_chunked"] > 0
               for f in forms.values())
    assert "quadratic/chunked" in format_report(results)
    assert os.environ.get("HYBRIDLM_BACKEND") is None  # the forced form does not outlive the bench
    gla = run(tiny_settings(presets=("gla-tiny",), decode_contexts=(8,), train_length=0), log=lambda _: None)
    assert "linear_attention_forms" not in gla["presets"]["gla-tiny"]  # a decay per feature has no quadratic form

import dataclasses

import pytest

from hybridlm import ModelConfig, describe
from hybridlm.cli import main

GIB = 2**30


# Jamba paper (arXiv 2403.19887) Table 1: KV cache at 256K tokens in 16-bit; its GB are GiB. It counts Mistral-7B
# (32 GB) without its sliding window of 4096: that shape without the window is checked, the preset keeps the window.
JAMBA_TABLE_1 = [("llama2-7b", 128), ("mistral-7b-full-attention", 32), ("mixtral-8x7b", 32), ("jamba-52b", 4)]


def _table_config(preset: str) -> ModelConfig:
    if preset == "mistral-7b-full-attention":
        return dataclasses.replace(ModelConfig.preset("mistral-7b"), sliding_window=None)
    return ModelConfig.preset(preset)


@pytest.mark.parametrize("preset, kv_gib", JAMBA_TABLE_1)
def test_kv_cache_at_256k_reproduces_jamba_table_1(preset, kv_gib):
    d = describe(_table_config(preset), context=262144, dtype="bf16", batch=1)
    assert d.state_bytes["attention"] / GIB == pytest.approx(kv_gib, rel=0.05)


def test_sliding_window_kv_cache_is_bounded_by_the_window(capsys):
    # Mistral-7B-v0.1 (sliding_window 4096): 32 layers x 2 (k, v) x 8 KV heads x 128 x 2 bytes x 4096 = 512 MiB
    config = ModelConfig.preset("mistral-7b")
    at = {n: describe(config, context=n, dtype="bf16").state_bytes["attention"] for n in (1024, 4096, 262144)}
    assert at[4096] == at[262144] == 512 * 2**20 and at[1024] == at[4096] // 4
    assert describe(config, context=262144).state_names["attention"] == "KV cache (ring buffer of 4096 positions)"
    main(["describe", "mistral-7b", "--context", "262144", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert "512.00 MiB   KV cache (ring buffer of 4096 positions)" in out


@pytest.mark.parametrize("preset, total, active", [
    ("mamba-130m", 129_135_360, 129_135_360),
    ("mamba2-130m", 128_989_632, 128_989_632),
    ("llama2-7b", 6_738_415_616, 6_738_415_616),  # meta-llama/Llama-2-7b-hf
    ("mistral-7b", 7_241_732_096, 7_241_732_096),  # mistralai/Mistral-7B-v0.1
    ("mixtral-8x7b", 46.7e9, 12.9e9),  # Mixtral paper: 47B total, 13B active
    ("jamba-52b", 51.6e9, 12.1e9),  # Jamba paper: 52B total, 12B active
    ("dbrx-132b", 132e9, 36e9),  # DBRX: 132B total, 36B active
])
def test_parameter_counts(preset, total, active):
    d = describe(ModelConfig.preset(preset))
    if isinstance(total, int):  # published exact counts must match exactly
        assert (d.total_params, d.active_params) == (total, active)
    else:
        assert d.total_params == pytest.approx(total, rel=0.01)
        assert d.active_params == pytest.approx(active, rel=0.02)


def _attention_gib(out: str) -> float:
    line = next(line for line in out.splitlines() if line.strip().startswith("attention"))
    value, unit = line.split()[1:3]
    assert unit == "GiB", line
    return float(value)


@pytest.mark.parametrize("preset, kv_gib", [t for t in JAMBA_TABLE_1 if t[0] != "mistral-7b-full-attention"])
def test_cli_describe_reproduces_jamba_table_1(preset, kv_gib, capsys):
    main(["describe", preset, "--context", "262144", "--dtype", "bf16", "--batch", "1"])
    assert _attention_gib(capsys.readouterr().out) == pytest.approx(kv_gib, rel=0.05)
    main(["describe", preset, "--context", "262144", "--dtype", "fp32", "--batch", "2"])
    assert _attention_gib(capsys.readouterr().out) == pytest.approx(4 * kv_gib, rel=0.05)  # 2x dtype, 2x batch


@pytest.mark.parametrize("preset, count", [("mamba-130m", "129,135,360"), ("mamba2-130m", "128,989,632")])
def test_cli_describe_prints_exact_published_parameter_counts(preset, count, capsys):
    main(["describe", preset, "--context", "262144", "--dtype", "bf16", "--batch", "1"])
    out = capsys.readouterr().out
    assert f"parameters    {count} total, {count} active per token" in out
    assert not any(line.strip().startswith("attention") for line in out.splitlines())  # no KV cache
    assert "conv + SSM state (fixed size)" in out


def test_ssm_state_does_not_grow_with_context():
    short = describe(ModelConfig.preset("mamba-130m"), context=512)
    long = describe(ModelConfig.preset("mamba-130m"), context=262144)
    assert short.state_bytes == long.state_bytes
    assert describe(ModelConfig.preset("mamba-130m"), batch=4).state_total == 4 * short.state_total


def test_cli_presets_describe_generate(capsys, tmp_path):
    main(["presets"])
    out = capsys.readouterr().out
    for name in ("mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m", "jamba-52b", "dbrx-132b"):
        assert name in out
    main(["describe", "jamba-52b", "--context", "262144", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert "4.00 GiB" in out and "51,570,323,328 total" in out and "MMMMAMMM" in out
    path = tmp_path / "c.json"
    ModelConfig.preset("mamba-tiny").to_json(path)
    main(["describe", "--config", str(path), "--context", "100", "--dtype", "fp32"])
    assert "mamba" in capsys.readouterr().out
    main(["generate", "--preset", "jamba-tiny", "--prompt", "Hi", "--max-new-tokens", "5", "--seed", "0"])
    assert capsys.readouterr().out.startswith("Hi")


def test_cli_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit, match="unknown preset 'nope'"):
        main(["describe", "nope"])
    with pytest.raises(SystemExit, match="config file not found"):
        main(["describe", str(tmp_path / "missing.json")])
    path = tmp_path / "small_vocab.json"
    ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2).to_json(path)
    with pytest.raises(SystemExit, match="byte tokenizer needs vocab_size >= 259"):
        main(["generate", "--config", str(path), "--prompt", "x"])

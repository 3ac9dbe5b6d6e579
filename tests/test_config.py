import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM, ModelConfig
from hybridlm.layers import MIXERS
from hybridlm.presets import PRESETS


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        config = ModelConfig.preset(name)
        assert len(config.layers) == config.n_layers
        assert config.name == name


def test_pattern_tiles_and_ffn_rule_follows_jamba():
    config = ModelConfig.preset("jamba-52b")
    assert config.layers == "MMMMAMMM" * 4
    assert config.ffn_pattern == "FE" * 16  # MoE at odd layers (period 2, offset 1)
    assert config.layers.count("A") * 7 == config.layers.count("M")  # 1:7
    assert ModelConfig.preset("mamba-130m").ffn_pattern == "-" * 24


# One invalid value for every field of ModelConfig, with the words its error must contain.
INVALID = {
    "vocab_size": (2.5, "positive integer"),
    "d_model": (0, "positive integer"),
    "n_layers": (-1, "positive integer"),
    "layers": ("AXAA", "letters from"),
    "ffn": ("swiglu", "one of"),
    "moe_every": (-2, ">= 0"),
    "moe_offset": (-1, "integer >= 0"),
    "d_ff": (0, "positive integer"),
    "n_heads": (0, "positive integer"),
    "n_kv_heads": (3, "divisor of n_heads"),
    "head_dim": (15, "even number"),
    "rope_theta": (-1.0, "positive number or None"),
    "attn_bias": ("yes", "True or False"),
    "sliding_window": (0, "positive integer (positions each query sees) or None"),
    "d_state": (0, "positive integer"),
    "dt_rank": (-3, "positive integer"),
    "mamba_inner_norms": (1, "True or False"),
    "mamba2_d_state": (0, "positive integer"),
    "mamba2_headdim": (48, "divisor of expand*d_model"),
    "mamba2_ngroups": (3, "divisor of the Mamba-2 head count"),
    "mamba2_chunk_size": (0, "positive integer"),
    "d_conv": (0, "positive integer"),
    "expand": (1.5, "positive integer"),
    "dt_min": (0.0, "positive number"),
    "dt_max": (0.0001, ">= dt_min"),
    "dt_init_floor": (-1e-4, "positive number"),
    "conv_bias": (None, "True or False"),
    "proj_bias": ("false", "True or False"),
    "n_experts": (0, "positive integer"),
    "top_k": (9, "at most n_experts"),
    "moe_normalize_topk": (0, "True or False"),
    "moe_aux_loss_coef": (-0.1, ">= 0"),
    "mixer_options": ({"X": {}}, "options of the mixers in layers"),
    "norm_eps": (0.0, "positive number"),
    "tie_embeddings": ("no", "True or False"),
    "pad_vocab_size_multiple": (0, "positive integer"),
    "initializer_range": (float("nan"), "positive number"),
    "name": ("", "non-empty string"),
}


def test_every_field_has_an_invalid_case():
    assert set(INVALID) == {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.parametrize("field", list(INVALID))
def test_invalid_field_names_field_expected_and_given(field):
    value, expected = INVALID[field]
    base = dict(d_model=64, n_layers=4, layers="AMSA", n_heads=4, n_experts=8, top_k=2, mamba2_headdim=16)
    base[field] = value
    with pytest.raises(ValueError) as err:
        ModelConfig(**base)
    message = str(err.value)
    assert f"ModelConfig.{field}: expected" in message and expected in message, message
    assert message.endswith(f"got {value!r}"), message


def test_pattern_length_must_divide_n_layers():
    with pytest.raises(ValueError, match=r"ModelConfig.layers: .*length divides n_layers=4, got 'AMA'"):
        ModelConfig(n_layers=4, layers="AMA")


def test_moe_offset_must_be_below_period():
    with pytest.raises(ValueError, match=r"ModelConfig.moe_offset: .*\[0, moe_every=2\).*got 2"):
        ModelConfig(n_layers=4, moe_every=2, moe_offset=2)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"d_model": 64, "d_modle": 32})


@st.composite
def configs(draw) -> ModelConfig:
    """Valid configs of every family and hybrid pattern, with every kind of field drawn."""
    pattern = draw(st.text(alphabet="AMS", min_size=1, max_size=4))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    d_model = draw(st.sampled_from([32, 64, 96]))
    headdim = draw(st.sampled_from([8, 16, 32]))
    mamba2_heads = 2 * d_model // headdim
    n_experts = draw(st.integers(2, 8))
    moe_every = draw(st.integers(0, 3))
    dt_min = draw(st.floats(1e-4, 1e-2))
    return ModelConfig(
        d_model=d_model, n_layers=len(pattern) * draw(st.integers(1, 3)), layers=pattern,
        ffn=draw(st.sampled_from(["none", "mlp"])), moe_every=moe_every,
        moe_offset=draw(st.integers(0, max(moe_every - 1, 0))), d_ff=draw(st.one_of(st.none(), st.integers(1, 96))),
        n_heads=n_heads, n_kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0])),
        rope_theta=draw(st.one_of(st.none(), st.floats(1.0, 1e6))), attn_bias=draw(st.booleans()),
        d_state=draw(st.integers(1, 32)), dt_rank=draw(st.one_of(st.none(), st.integers(1, 8))),
        mamba_inner_norms=draw(st.booleans()), mamba2_d_state=draw(st.integers(1, 64)), mamba2_headdim=headdim,
        mamba2_ngroups=draw(st.sampled_from([g for g in (1, 2, 3, 4) if mamba2_heads % g == 0])),
        mamba2_chunk_size=draw(st.integers(1, 256)), d_conv=draw(st.integers(2, 4)),
        dt_min=dt_min, dt_max=draw(st.floats(dt_min, 0.5)), conv_bias=draw(st.booleans()),
        proj_bias=draw(st.booleans()), n_experts=n_experts, top_k=draw(st.integers(1, n_experts)),
        moe_normalize_topk=draw(st.booleans()), moe_aux_loss_coef=draw(st.floats(0, 1)),
        norm_eps=draw(st.floats(1e-8, 1e-3)), tie_embeddings=draw(st.booleans()),
        vocab_size=draw(st.integers(1, 70000)), pad_vocab_size_multiple=draw(st.sampled_from([1, 8, 16, 64])),
        name=draw(st.text(min_size=1, max_size=12)),
    )


@settings(max_examples=100, deadline=None)
@given(configs())
def test_json_round_trip(config):
    again = ModelConfig.from_json(config.to_json())
    assert again == config and again.name == config.name  # name is not part of ==, check it too
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert again.layers == config.layers and again.ffn_pattern == config.ffn_pattern


def test_every_registered_mixer_letter_is_accepted():
    for letter in MIXERS:
        assert ModelConfig(d_model=64, n_layers=2, layers=letter, mamba2_headdim=16).layers == letter * 2


def test_model_from_saved_config_file_equals_preset(tmp_path):
    preset = ModelConfig.preset("jamba-tiny")
    path = tmp_path / "config.json"
    preset.to_json(path)
    loaded = ModelConfig.from_json(path)
    assert loaded == preset and loaded.name == "jamba-tiny"
    torch.manual_seed(11)
    a = HybridLM(preset).eval()
    torch.manual_seed(11)
    b = HybridLM(loaded).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:  # same modules, same shapes, same initialisation from the same seed
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, preset.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "nope.json")


def test_required_presets_and_their_shapes():
    required = {"mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m", "mamba-tiny", "mamba2-tiny", "llama-tiny",
                "jamba-tiny", "llama2-7b", "mistral-7b", "mixtral-8x7b", "jamba-52b", "dbrx-132b"}
    assert required <= set(PRESETS)
    families = {name: ModelConfig.preset(name).family for name in required}
    for size in ("130m", "tiny"):
        assert [families[f"{f}-{size}"] for f in ("mamba", "mamba2", "llama", "jamba")] == [
            "mamba", "mamba2", "transformer", "hybrid"]
    jamba = ModelConfig.preset("jamba-130m")  # 1:7 attention:Mamba, MoE every other layer, 16 experts top-2
    assert jamba.layers.count("M") == 7 * jamba.layers.count("A")
    assert jamba.ffn_pattern == "FE" * (jamba.n_layers // 2) and (jamba.n_experts, jamba.top_k) == (16, 2)
    assert {ModelConfig.preset(n).d_model for n in ("mamba-130m", "mamba2-130m", "llama-130m", "jamba-130m")} == {768}
    dbrx = ModelConfig.preset("dbrx-132b")
    assert (dbrx.n_experts, dbrx.top_k, dbrx.ffn_pattern) == (16, 4, "E" * dbrx.n_layers)
    mamba2 = ModelConfig.preset("mamba2-130m")
    assert (mamba2.mamba2_d_state, mamba2.mamba2_headdim, mamba2.mamba2_ngroups, mamba2.mamba2_chunk_size) == (
        128, 64, 1, 256)
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; expected one of \["):
        ModelConfig.preset("nope")


# config.json files written by an earlier version (commit 7a7ba9d): ours, and Hugging Face exports that stash our
# config under hybridlm_config. They must still load to the same model.
SAVED = Path(__file__).parent / "data" / "configs-7a7ba9d"


# Presets that changed since, and how: mistral-7b gained Mistral-7B-v0.1's published sliding window.
CHANGED_SINCE = {"mistral-7b": dict(sliding_window=4096)}


@pytest.mark.parametrize("name", sorted(p.stem for p in SAVED.glob("*.json") if p.stem in PRESETS))
def test_config_files_of_an_earlier_version_load_to_the_same_config(name):  # the presets of that version
    loaded = ModelConfig.from_json(SAVED / f"{name}.json")
    assert dataclasses.replace(loaded, **CHANGED_SINCE.get(name, {})) == ModelConfig.preset(name)


@pytest.mark.parametrize("name", ["mamba-tiny", "mamba2-tiny", "llama-tiny", "jamba-small"])
def test_hf_exports_of_an_earlier_version_give_back_the_stashed_config(name, tmp_path):
    import warnings

    from hybridlm.interop import load_config

    (tmp_path / "config.json").write_text((SAVED / f"hf-{name}.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stash found not to match would warn and fall back to the translation
        loaded = load_config(tmp_path)
    expected = ModelConfig.from_json(SAVED / f"{name}.json")
    assert loaded == expected and loaded.name == expected.name and loaded.vocab_size == expected.vocab_size
    assert HybridLM(loaded).num_parameters() == HybridLM(expected).num_parameters()

"""Parity with Hugging Face transformers: import, greedy generation, export, round trips."""

from __future__ import annotations

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.interop import detect_format

transformers = pytest.importorskip("transformers")
from interop_models import HF_KINDS, VOCAB, hf_model  # noqa: E402

EXPECTED_FORMAT = {"mamba": "hf_mamba", "mamba2": "hf_mamba2", "llama": "hf_llama", "llama-tied": "hf_llama",
                   "mistral": "hf_llama", "mixtral": "hf_llama", "jamba": "hf_jamba"}


@pytest.fixture(scope="module", params=HF_KINDS)
def hf_pair(request, tmp_path_factory):
    """(kind, HF model, its directory, our model loaded from that directory)."""
    torch.manual_seed(1)
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, HybridLM.from_pretrained(path).eval()


def test_detects_layout(hf_pair):
    kind, _, path, _ = hf_pair
    assert detect_format(path) == EXPECTED_FORMAT[kind]


def test_logits_match_transformers(hf_pair):
    _, hf, _, ours = hf_pair
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(hf_pair):
    _, hf, _, ours = hf_pair
    ids = torch.randint(0, VOCAB, (2, 7))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones_like(ids))
    got = ours.generate(ids, 20, temperature=0)
    assert got.shape == (2, 27)
    assert torch.equal(got, expected)


def test_export_reloads_in_transformers(hf_pair, tmp_path):
    kind, hf, _, ours = hf_pair
    assert ours.save_pretrained(tmp_path / "hf", format="hf") == detect_format(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    # A Mistral without sliding window is a Llama: the export writes the plainer class.
    expected_class = "LlamaForCausalLM" if kind == "mistral" else type(hf).__name__
    assert type(reloaded).__name__ == expected_class
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- ours -> HF -> ours, bit-exact
ROUND_TRIP = {
    "mamba-tiny": ModelConfig.preset("mamba-tiny"),
    "mamba2-tiny-groups": ModelConfig(d_model=64, n_layers=2, layers="S", ffn="none", mamba2_d_state=16,
                                      mamba2_headdim=16, mamba2_ngroups=2, mamba2_chunk_size=16),
    "llama-tiny": ModelConfig.preset("llama-tiny"),
    "llama-untied-bias": ModelConfig(d_model=64, n_layers=2, layers="A", n_heads=4, n_kv_heads=1, d_ff=96,
                                     attn_bias=True, tie_embeddings=False, rope_theta=1e6),
    "mixtral-tiny": ModelConfig(d_model=64, n_layers=2, layers="A", n_heads=4, n_kv_heads=2, d_ff=96, moe_every=1,
                                n_experts=4, top_k=2),
    "jamba-hf-tiny": ModelConfig(d_model=64, n_layers=4, layers="MMAM", ffn="mlp", moe_every=2, moe_offset=1,
                                 n_experts=4, top_k=2, moe_normalize_topk=False, n_heads=4, n_kv_heads=2, d_ff=96,
                                 d_state=8, mamba_inner_norms=True, rope_theta=None),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip_through_hf_is_bit_exact(name, tmp_path):
    model = HybridLM(ROUND_TRIP[name]).eval()
    model.save_pretrained(tmp_path / "hf", format="hf")
    back = HybridLM.from_pretrained(tmp_path / "hf")
    assert back.config == model.config  # the byte-level vocab size (259, padded to 264) survives too
    theirs = back.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(theirs[key], tensor), key
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_model_made_in_hybridlm_runs_in_transformers(name, tmp_path):
    """A model born in hybridlm (byte-level vocab 259 padded to 264), exported, gives our logits in transformers."""
    torch.manual_seed(6)
    model = HybridLM(ROUND_TRIP[name]).eval()
    with torch.no_grad():  # move norms, D, biases off their ones/zeros init, so a skipped mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf", format="hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-4, rtol=0)


def test_export_refuses_what_the_class_cannot_hold(tmp_path):
    model = HybridLM(ModelConfig.preset("jamba-tiny"))  # holds a Mamba-2 layer: no HF class has that mix
    with pytest.raises(ValueError, match="JambaForCausalLM cannot hold"):
        model.save_pretrained(tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_config_translation_refuses_unsupported_settings(tmp_path):
    from hybridlm.interop import hf_llama, hf_mamba2

    with pytest.raises(ValueError, match="rope type 'llama3' is not supported"):
        hf_llama.to_config({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="time_step_limit"):
        hf_mamba2.to_config({"time_step_limit": [0.0, 0.1], "hidden_size": 64, "num_heads": 2, "head_dim": 64})
    with pytest.raises(ValueError, match="ModelConfig.sliding_window: expected a positive integer"):
        hf_llama.to_config({"model_type": "mistral", "sliding_window": 0, "hidden_size": 64,
                            "num_attention_heads": 4})

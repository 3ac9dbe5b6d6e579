"""The official mamba_ssm layout, sharded weights, and the errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm import HybridLM, ModelConfig
from hybridlm.checkpoint import CheckpointError, WeightFiles
from hybridlm.interop import detect_format

transformers = pytest.importorskip("transformers")
from interop_models import VOCAB, hf_model  # noqa: E402


def _official_from_hf(hf, path, layer: str, weights: str) -> None:
    """Write ``hf``'s tensors in the mamba_ssm layout: backbone.embedding, tied lm_head stored as well (as
    MambaLMHeadModel.save_pretrained does), vocab 100 padded to a multiple of 8 (104 rows)."""
    path.mkdir()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    c = hf.config
    ssm = ({"layer": "Mamba1", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
            "dt_rank": c.time_step_rank} if layer == "Mamba1" else
           {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
            "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size})
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": 100,
              "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        state.pop("lm_head.weight")
        save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("layer,weights", [("Mamba1", "bin"), ("Mamba1", "safetensors"), ("Mamba2", "bin")])
def test_official_layout_matches_hf(layer, weights, tmp_path):
    torch.manual_seed(2)
    hf = hf_model("mamba" if layer == "Mamba1" else "mamba2")
    if layer == "Mamba2":  # the official layout ties the head; make the HF reference tied too
        hf.lm_head.weight = hf.backbone.embeddings.weight
    _official_from_hf(hf, tmp_path / "official", layer, weights)
    assert detect_format(tmp_path / "official") == "mamba_ssm"
    ours = HybridLM.from_pretrained(tmp_path / "official").eval()
    assert ours.config.vocab_size == 100 and ours.config.padded_vocab_size == VOCAB
    ids = torch.randint(0, 100, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    # and back out to the official layout, which reads in again identically
    ours.save_pretrained(tmp_path / "again", format="mamba_ssm")
    again = HybridLM.from_pretrained(tmp_path / "again")
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))


def test_official_layout_refuses_mlp_and_attention(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "d_intermediate": 256}))
    with pytest.raises(ValueError, match="d_intermediate=256 is not supported"):
        HybridLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ sharding
def test_own_format_shards_above_threshold(tmp_path):
    model = HybridLM(ModelConfig.preset("jamba-tiny"))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) - {"lm_head.weight"}
    loaded = HybridLM.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_reads_sharded_hf_checkpoint(tmp_path):
    torch.manual_seed(3)
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = HybridLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_missing_shard_is_named(tmp_path):
    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    victim = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name}, which is missing"):
        HybridLM.from_pretrained(tmp_path / "ckpt")


# -------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(4)
    hf_model("mamba").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_truncated_safetensors_names_the_file(hf_dir):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file.*(truncated|incomplete)"):
        HybridLM.from_pretrained(hf_dir)


def test_corrupted_header_names_the_file(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        HybridLM.from_pretrained(hf_dir)


def _rewrite(hf_dir, change) -> None:
    tensors = load_file(str(hf_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"))


def test_missing_tensor_is_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("backbone.layers.1.mixer.x_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor backbone\.layers\.1\.mixer\.x_proj\.weight is missing "
                                              r"\(expected shape \(20, 64\)"):
        HybridLM.from_pretrained(hf_dir)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"backbone.layers.0.mixer.A_log": torch.zeros(64, 4)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor backbone\.layers\.0\.mixer\.A_log has "
                                              r"shape \(64, 4\), expected \(64, 8\)"):
        HybridLM.from_pretrained(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"backbone.layers.0.mixer.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['backbone\.layers\.0\.mixer\.extra'\]"):
        HybridLM.from_pretrained(hf_dir)


class _NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    config = ModelConfig.preset("mamba-tiny")
    source = {"d_model": config.d_model, "n_layer": config.n_layers, "vocab_size": 259}
    (tmp_path / "config.json").write_text(json.dumps(source))
    torch.save({"backbone.embedding.weight": torch.zeros(3), "payload": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        HybridLM.from_pretrained(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        HybridLM.from_pretrained(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, directory):
            (directory / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    model = HybridLM(ModelConfig.preset("mamba-tiny"))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", format="hf", tokenizer=Broken())
    assert os.listdir(tmp_path) == []
    # an existing checkpoint survives a failed overwrite untouched
    model.save_pretrained(tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", format="hybridlm", tokenizer=Broken())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert os.listdir(tmp_path) == ["out"]
    WeightFiles(tmp_path / "out")  # still readable


def test_layout_detected_from_model_type_alone_or_named_explicitly(hf_dir, tmp_path):
    config_file = hf_dir / "config.json"
    data = json.loads(config_file.read_text())
    reference = HybridLM.from_pretrained(hf_dir).eval()
    data.pop("architectures")
    config_file.write_text(json.dumps(data))
    assert detect_format(hf_dir) == "hf_mamba"  # model_type "mamba" is enough
    data.pop("model_type")
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot tell the layout"):
        detect_format(hf_dir)
    named = HybridLM.from_pretrained(hf_dir, format="hf_mamba").eval()  # named explicitly, no detection
    ids = torch.randint(0, VOCAB, (1, 7))
    assert torch.equal(named(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match=r"format: unknown 'hf_gpt2'; expected 'hybridlm' or one of"):
        HybridLM.from_pretrained(hf_dir, format="hf_gpt2")

    from hybridlm.cli import main

    main(["convert", str(hf_dir), str(tmp_path / "ours"), "--from", "hf_mamba"])
    assert torch.equal(HybridLM.from_pretrained(tmp_path / "ours")(ids).logits, reference(ids).logits)

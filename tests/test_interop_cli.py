"""`hybridlm convert` and `generate --checkpoint` on foreign layouts; the tokenizer travels with the model."""

from __future__ import annotations

import json

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.cli import main
from hybridlm.interop import detect_format
from hybridlm.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from interop_models import perturb  # noqa: E402


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random HF MambaForCausalLM with a small byte-level BPE tokenizer.json and tokenizer_config.json."""
    path = tmp_path_factory.mktemp("hf_mamba")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    torch.manual_seed(5)
    config = transformers.MambaConfig(vocab_size=304, hidden_size=32, state_size=8, num_hidden_layers=2)
    perturb(transformers.MambaForCausalLM(config)).save_pretrained(path)
    return path


def test_tokenizer_found_beside_checkpoint(hf_checkpoint):
    tok = load_tokenizer(hf_checkpoint)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1  # from tokenizer_config.json
    ids = tok.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and tok.decode(ids[1:-1]) == "hello world"
    assert isinstance(load_tokenizer(hf_checkpoint.parent), ByteTokenizer)  # no tokenizer.json: byte-level


def test_convert_keeps_weights_and_tokenizer(hf_checkpoint, tmp_path, capsys):
    main(["convert", str(hf_checkpoint), str(tmp_path / "ours")])
    assert detect_format(tmp_path / "ours") == "hybridlm"
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (hf_checkpoint / "tokenizer.json").read_bytes()
    assert load_tokenizer(tmp_path / "ours").encode("the cat") == load_tokenizer(hf_checkpoint).encode("the cat")
    a, b = HybridLM.from_pretrained(hf_checkpoint), HybridLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf16"), "--to", "hf", "--dtype", "f16"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf16")
    assert reloaded.dtype == torch.float16 and (tmp_path / "hf16" / "tokenizer.json").is_file()

    pytest.importorskip("gguf")
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "m.gguf")])
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert "(mamba)" in capsys.readouterr().out


def test_generate_from_hf_checkpoint(hf_checkpoint, capsys):
    main(["generate", "--checkpoint", str(hf_checkpoint), "--prompt", "the cat", "--max-new-tokens", "5",
          "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("the cat") and len(out) > len("the cat")


def test_describe_reads_hf_config(hf_checkpoint, capsys):
    main(["describe", str(hf_checkpoint)])
    assert "mamba" in capsys.readouterr().out


def test_convert_error_is_clear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(SystemExit, match="unsupported architecture"):
        main(["convert", str(tmp_path), str(tmp_path / "out")])

"""Shared by the post-training tests: a word-level Hugging Face tokenizer, small models saved with it, and data
files in TRL's formats."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from interop_models import VOCAB, hf_model

WORDS = [f"w{i}" for i in range(VOCAB - 3)]
SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}


def hf_tokenizer():
    """A ``PreTrainedTokenizerFast`` over ``WORDS`` split on whitespace, ids 0-2 the special tokens; its vocabulary
    is the size of the interop test models' (``VOCAB``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS.values(), *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(SPECIALS.values()))
    # Llama's tokenizers put <bos> first this way: TRL gets it from the tokenizer, hybridlm from bos_token_id
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, **{f"{k}_token": v for k, v in SPECIALS.items()})


def save_hf_model(kind: str, path: Path, seed: int = 0) -> Path:
    """A small random ``transformers`` model of ``kind`` (see ``interop_models``), with the tokenizer, at ``path``."""
    torch.manual_seed(seed)
    model = hf_model(kind)
    model.config.update({f"{k}_token_id": i for i, k in enumerate(SPECIALS)})
    model.save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


def sentence(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Pairs with prompts and completions of different lengths (so rows pad differently)."""
    rng = torch.Generator().manual_seed(seed)
    return [{"prompt": sentence(rng, 3 + i % 4), "chosen": " " + sentence(rng, 2 + i % 3),
             "rejected": " " + sentence(rng, 1 + (i + 1) % 5)} for i in range(n)]

"""Export to GGUF, llama.cpp's file format, with the ``gguf`` package (the optional ``[gguf]`` extra).

One llama.cpp architecture per family: ``mamba`` (Mamba-1), ``mamba2``, ``llama`` (attention with rotary
positions; with MoE in every layer it is llama.cpp's Mixtral path) and ``jamba`` (Mamba-1 with dt/B/C norms,
attention without positions, MLP or MoE per layer). Tensor names come from gguf's own tables
(``gguf.TENSOR_NAMES``), the metadata keys from its writer; the layout changes llama.cpp expects are:

- ``ssm_a`` holds A = -exp(A_log) (llama.cpp does not exponentiate); Mamba-2's A and D get a trailing axis of
  1 and its gated-norm weight is stored as (ngroups, d_inner / ngroups);
- ``ssm_conv1d`` is (channels, d_conv), the conv weight without its middle axis of 1;
- ``llama``'s query and key rows are reordered from the half-split rotary layout (ours and Hugging Face's) to
  llama.cpp's interleaved pairs, the same permutation llama.cpp's converter applies;
- the tokenizer goes inside as a byte-level BPE (``tokenizer.ggml.model = "gpt2"``): our byte tokenizer as 256
  byte symbols plus its specials, or a Hugging Face byte-level BPE ``tokenizer.json`` with its merges.

Checks that llama.cpp would fail on (expand != 2 for Mamba layers, a Mamba-2 layer in a hybrid, attention
without rotary positions in a Transformer) are errors here, before anything is written. A sliding window is not
written: llama.cpp's llama and jamba architectures attend to the whole context (its converter drops Mistral's window
too), so the export warns that results match only up to the window.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hybridlm.atomic_files import atomic_path

if TYPE_CHECKING:
    from hybridlm.model import HybridLM

ARCH_BY_FAMILY = {"mamba": "mamba", "mamba2": "mamba2", "transformer": "llama", "hybrid": "jamba"}

# Our tensor name suffix -> (gguf MODEL_TENSOR member, suffix). Layer tensors are "layers.{i}.<ours>".
_LAYER_TENSORS = {
    "norm.weight": ("ATTN_NORM", ".weight"),
    "mixer.q_proj.weight": ("ATTN_Q", ".weight"), "mixer.q_proj.bias": ("ATTN_Q", ".bias"),
    "mixer.k_proj.weight": ("ATTN_K", ".weight"), "mixer.k_proj.bias": ("ATTN_K", ".bias"),
    "mixer.v_proj.weight": ("ATTN_V", ".weight"), "mixer.v_proj.bias": ("ATTN_V", ".bias"),
    "mixer.o_proj.weight": ("ATTN_OUT", ".weight"), "mixer.o_proj.bias": ("ATTN_OUT", ".bias"),
    "mixer.in_proj.weight": ("SSM_IN", ".weight"),
    "mixer.conv1d.weight": ("SSM_CONV1D", ".weight"), "mixer.conv1d.bias": ("SSM_CONV1D", ".bias"),
    "mixer.x_proj.weight": ("SSM_X", ".weight"),
    "mixer.dt_proj.weight": ("SSM_DT", ".weight"), "mixer.dt_proj.bias": ("SSM_DT", ".bias"),
    "mixer.dt_bias": ("SSM_DT", ".bias"),
    "mixer.A_log": ("SSM_A", ""), "mixer.D": ("SSM_D", ""),
    "mixer.norm.weight": ("SSM_NORM", ".weight"),
    "mixer.dt_layernorm.weight": ("SSM_DT_NORM", ".weight"),
    "mixer.b_layernorm.weight": ("SSM_B_NORM", ".weight"),
    "mixer.c_layernorm.weight": ("SSM_C_NORM", ".weight"),
    "mixer.out_proj.weight": ("SSM_OUT", ".weight"),
    "ffn_norm.weight": ("FFN_NORM", ".weight"),
    "ffn.gate_proj.weight": ("FFN_GATE", ".weight"), "ffn.up_proj.weight": ("FFN_UP", ".weight"),
    "ffn.down_proj.weight": ("FFN_DOWN", ".weight"),
    "ffn.router.weight": ("FFN_GATE_INP", ".weight"),
    "ffn.gate_proj": ("FFN_GATE_EXP", ".weight"), "ffn.up_proj": ("FFN_UP_EXP", ".weight"),
    "ffn.down_proj": ("FFN_DOWN_EXP", ".weight"),
}
_MODEL_TENSORS = {"embedding.weight": ("TOKEN_EMBD", ".weight"), "norm_f.weight": ("OUTPUT_NORM", ".weight"),
                  "lm_head.weight": ("OUTPUT", ".weight")}
# Stored in float32 whatever the export dtype: llama.cpp's SSM ops and norms read them as f32.
_ALWAYS_F32 = ("mixer.conv1d.weight", "mixer.A_log", "mixer.D", "ffn.router.weight")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("GGUF export needs the `gguf` package: pip install 'hybridlm[gguf]'") from e
    return gguf


def gguf_name(ours: str) -> str:
    """llama.cpp's name for our tensor ``ours`` (e.g. "layers.3.mixer.in_proj.weight" -> "blk.3.ssm_in.weight")."""
    gguf = _gguf()
    if ours in _MODEL_TENSORS:
        member, suffix = _MODEL_TENSORS[ours]
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]] + suffix
    _, i, rest = ours.split(".", 2)
    member, suffix = _LAYER_TENSORS[rest]
    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=int(i)) + suffix


def check_exportable(model: HybridLM) -> str:
    """The llama.cpp architecture for ``model``; ValueError naming what llama.cpp cannot run."""
    c = model.config
    if c.family not in ARCH_BY_FAMILY:
        raise ValueError(f"GGUF: llama.cpp has no architecture for a {c.family} model (layers {c.layers!r})")
    arch = ARCH_BY_FAMILY[c.family]
    problems = []
    if "M" in c.layers and c.expand != 2:
        problems.append(f"llama.cpp's Mamba layers need expand=2 (d_inner = 2 d_model), got {c.expand}")
    if c.proj_bias and set(c.layers) & {"M", "S"}:
        problems.append("llama.cpp's Mamba layers have no in/out projection biases (proj_bias=True)")
    if arch == "mamba" and c.mamba_inner_norms:
        problems.append("llama.cpp's mamba architecture has no learned dt/B/C norms (mamba_inner_norms=True); "
                        "a model with them is a Jamba")
    if arch == "llama":
        if c.rope_theta is None:
            problems.append("llama.cpp's llama architecture always applies rotary positions (rope_theta=None)")
        if c.moe_every not in (0, 1) or (c.moe_every and not c.moe_normalize_topk):
            problems.append("llama.cpp's llama architecture has MoE in every layer or none, with renormalised "
                            "top-k weights")
    if arch == "jamba":
        if "L" in c.layers:
            problems.append("llama.cpp has no linear-attention layers")
        if "S" in c.layers:
            problems.append("llama.cpp has no hybrid architecture with Mamba-2 layers (only jamba: attention + "
                            "Mamba-1)")
        if not c.mamba_inner_norms:
            problems.append("llama.cpp's jamba needs dt/B/C norms (mamba_inner_norms=True)")
        if c.rope_theta is not None:
            problems.append("llama.cpp's jamba attention has no positional encoding (needs rope_theta=None)")
        if c.n_heads * c.head_dim != c.d_model or c.attn_bias:
            problems.append("llama.cpp's jamba attention needs n_heads*head_dim = d_model and no biases")
        if c.moe_every and c.moe_normalize_topk:
            problems.append("llama.cpp's jamba does not renormalise the top-k expert weights")
        if "-" in c.ffn_pattern:
            problems.append("llama.cpp's jamba has a feed-forward in every layer (ffn='mlp')")
    if problems:
        raise ValueError(f"GGUF export ({arch}) of {c.summary()}: " + "; ".join(problems))
    return arch


def _tensor(model: HybridLM, ours: str, tensor: torch.Tensor, arch: str) -> np.ndarray:
    # Our tensor -> the array llama.cpp expects (shapes in PyTorch's row-major order; gguf reverses them).
    c = model.config
    rest = ours.split(".", 2)[-1]
    t = tensor.detach().float().cpu()
    if rest == "mixer.A_log":
        t = -torch.exp(t)
    if rest == "mixer.conv1d.weight":
        t = t[:, 0, :]
    if arch == "mamba2" and rest in ("mixer.A_log", "mixer.D"):
        t = t[:, None]
    if arch == "mamba2" and rest == "mixer.norm.weight":
        t = t.reshape(c.mamba2_ngroups, -1)
    if arch == "llama" and rest in ("mixer.q_proj.weight", "mixer.q_proj.bias", "mixer.k_proj.weight",
                                    "mixer.k_proj.bias"):
        heads = c.n_heads if "q_proj" in rest else c.n_kv_heads
        # rows of each head: [first half | second half] -> interleaved pairs (x0, x_half, x1, x_half+1, ...)
        t = t.reshape(heads, 2, c.head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t.contiguous().numpy()


def _byte_symbols() -> list[str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (what byte-level BPE vocabularies
    are written in): printable Latin-1 bytes stand for themselves, the others take code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _vocabulary(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """tokens, token types, merges, pre-tokenizer and special ids for llama.cpp's byte-level BPE ("gpt2")."""
    gguf = _gguf()
    normal, control, user, unused = (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                                     gguf.TokenType.UNUSED)
    from hybridlm.tokenizer import ByteTokenizer

    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        byte = ByteTokenizer()
        tokens = [*_byte_symbols(), "<bos>", "<eos>", "<pad>"]
        types = [normal] * 256 + [control] * 3
        # gguf has no empty arrays and llama.cpp requires the key: one merge of two control tokens, which never
        # occur inside a word, so it never applies and every byte stays its own token.
        merges = ["<bos> <eos>"]
        special = {"bos": byte.bos_token_id, "eos": byte.eos_token_id, "pad": byte.pad_token_id}
        pre = "default"
    else:
        data = json.loads(Path(tokenizer.path).read_text())
        model = data.get("model", {})
        pre_tok = json.dumps(data.get("pre_tokenizer"))
        if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in pre_tok:
            raise ValueError(f"{tokenizer.path}: GGUF export supports byte-level BPE tokenizers (GPT-2, GPT-NeoX "
                             f"style); this one is {model.get('type')!r} with pre-tokenizer "
                             f"{(data.get('pre_tokenizer') or {}).get('type')!r}")
        by_id = {i: t for t, i in model["vocab"].items()}
        kinds = {i: normal for i in by_id}
        for added in data.get("added_tokens", []):
            by_id[added["id"]] = added["content"]
            kinds[added["id"]] = control if added.get("special") else user
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
        types = [kinds.get(i, unused) for i in range(len(tokens))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])] or ["<bos> <eos>"]
        special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
        pre = "gpt-2"
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's {n_vocab} embedding rows")
    # llama.cpp takes the vocabulary size from this list: pad it to the embedding rows.
    types += [unused] * (n_vocab - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "special": special}


def export_gguf(model: HybridLM, path: str | Path, tokenizer: Any = None,
                dtype: torch.dtype = torch.float32, context_length: int | None = None) -> str:
    """Write ``model`` (and its tokenizer; byte-level when None) to the GGUF file ``path`` for llama.cpp.

    ``dtype`` float32 or float16 for the matrices (norms, conv and SSM parameters stay float32).
    ``context_length`` is metadata for llama.cpp's default context (SSM families: 2**20, they have no limit;
    attention families: 4096). The file is written beside ``path`` and renamed. Returns the architecture."""
    gguf = _gguf()
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype: GGUF export writes float32 or float16, got {dtype}")
    arch = check_exportable(model)
    c = model.config
    if c.sliding_window is not None and "A" in c.layers:
        warnings.warn(f"GGUF export: sliding_window={c.sliding_window} is not written; llama.cpp's {arch} "
                      f"architecture attends to the whole context, which gives the same results up to "
                      f"{c.sliding_window} tokens", stacklevel=2)
    vocab = _vocabulary(tokenizer, c.padded_vocab_size)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(c.name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
        _add_hparams(writer, c, arch, context_length)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for kind, token_id in vocab["special"].items():
            if token_id is not None:
                getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(False)
        state = model.state_dict()
        if c.tie_embeddings:
            state.pop("lm_head.weight")  # llama.cpp reuses token_embd when output is absent
        for ours, tensor in state.items():
            array = _tensor(model, ours, tensor, arch)
            keep32 = array.ndim < 2 or ours.split(".", 2)[-1] in _ALWAYS_F32 or "norm" in ours
            writer.add_tensor(gguf_name(ours), array if keep32 or dtype == torch.float32 else array.astype(np.float16))
        if arch == "mamba" and not c.conv_bias or arch == "jamba" and not c.conv_bias:
            for i, letter in enumerate(c.layers):  # llama.cpp requires the conv bias: a zero one is the same
                if letter == "M":
                    writer.add_tensor(gguf_name(f"layers.{i}.mixer.conv1d.bias"), np.zeros(c.d_inner, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return arch


def _add_hparams(writer: Any, c: Any, arch: str, context_length: int | None) -> None:
    ssm = arch in ("mamba", "mamba2")
    writer.add_context_length(context_length or (2**20 if ssm else 4096))
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.padded_vocab_size)
    if ssm:  # llama.cpp reads these two for every architecture, unused by the SSMs
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
    else:
        writer.add_feed_forward_length(c.d_ff)
        writer.add_head_count(c.n_heads)
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if "M" in c.layers:
        writer.add_ssm_conv_kernel(c.d_conv)
        writer.add_ssm_inner_size(c.d_inner)
        writer.add_ssm_state_size(c.d_state)
        writer.add_ssm_time_step_rank(c.dt_rank)
        if arch == "mamba":
            writer.add_ssm_dt_b_c_rms(False)
    if arch == "mamba2":
        writer.add_ssm_conv_kernel(c.d_conv)
        writer.add_ssm_inner_size(c.d_inner)
        writer.add_ssm_state_size(c.mamba2_d_state)
        writer.add_ssm_time_step_rank(c.d_inner // c.mamba2_headdim)  # llama.cpp reads the head count here
        writer.add_ssm_group_count(c.mamba2_ngroups)
    if arch == "llama":
        writer.add_head_count_kv(c.n_kv_heads)
        writer.add_rope_freq_base(float(c.rope_theta))
        writer.add_rope_dimension_count(c.head_dim)
    if arch == "jamba":  # a layer with 0 KV heads is a Mamba layer: that is how llama.cpp reads the pattern
        writer.add_head_count_kv([c.n_kv_heads if letter == "A" else 0 for letter in c.layers])
    if c.moe_every:
        writer.add_expert_count(c.n_experts)
        writer.add_expert_used_count(c.top_k)

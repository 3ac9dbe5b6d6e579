"""Hugging Face ``JambaForCausalLM`` (Lieber et al. 2024, arXiv 2403.19887): Mamba-1 blocks with RMSNorms on
dt, B and C, one attention layer (no positional encoding) every ``attn_layer_period`` layers, and a top-k MoE
(weights not renormalised) every ``expert_layer_period`` layers; the other layers have a gated MLP."""

from __future__ import annotations

import math
from typing import Any

from hybridlm.config import ModelConfig
from hybridlm.interop.fields import check_activation, check_family

ARCHITECTURES = ("JambaForCausalLM",)
MODEL_TYPES = ("jamba",)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TABLE = [
    ("embedding.weight", "model.embed_tokens.weight"),
    ("layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *((f"layers.{{i}}.mixer.{p}.weight", f"model.layers.{{i}}.self_attn.{p}.weight") for p in _ATTENTION),
    ("layers.{i}.mixer.{name}", "model.layers.{i}.mamba.{name}"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.pre_ff_layernorm.weight"),
    ("layers.{i}.ffn.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("layers.{i}.ffn.gate_proj", "model.layers.{i}.feed_forward.experts.{e}.gate_proj.weight"),
    ("layers.{i}.ffn.up_proj", "model.layers.{i}.feed_forward.experts.{e}.up_proj.weight"),
    ("layers.{i}.ffn.down_proj", "model.layers.{i}.feed_forward.experts.{e}.down_proj.weight"),
    ("layers.{i}.ffn.{name}", "model.layers.{i}.feed_forward.{name}"),
    ("norm_f.weight", "model.final_layernorm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
IGNORE: tuple[str, ...] = ()


def to_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Hugging Face JambaConfig (absent keys take JambaConfig's defaults)."""
    check_activation(hf, "hidden_act")
    d_model, n_layers = hf.get("hidden_size", 4096), hf.get("num_hidden_layers", 32)
    period, offset = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    n_experts = hf.get("num_experts", 16)
    rank = hf.get("mamba_dt_rank", "auto")
    n_heads = hf.get("num_attention_heads", 32)
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 65536), pad_vocab_size_multiple=1, d_model=d_model, n_layers=n_layers,
        layers="".join("A" if i % period == offset else "M" for i in range(n_layers)), ffn="mlp",
        d_ff=hf.get("intermediate_size", 14336),
        moe_every=hf.get("expert_layer_period", 2) if n_experts > 1 else 0,
        moe_offset=hf.get("expert_layer_offset", 1) if n_experts > 1 else 0,
        n_experts=n_experts if n_experts > 1 else 8, top_k=hf.get("num_experts_per_tok", 2) if n_experts > 1 else 2,
        moe_normalize_topk=False, moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=d_model // n_heads,
        rope_theta=None, d_state=hf.get("mamba_d_state", 16), d_conv=hf.get("mamba_d_conv", 4),
        expand=hf.get("mamba_expand", 2), dt_rank=math.ceil(d_model / 16) if rank == "auto" else rank,
        conv_bias=hf.get("mamba_conv_bias", True), proj_bias=hf.get("mamba_proj_bias", False),
        mamba_inner_norms=True, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False), initializer_range=hf.get("initializer_range", 0.02),
        name=hf.get("_name_or_path") or "hf-jamba",
    )


def _attention_period(layers: str) -> tuple[int, int]:
    """(period, offset) with layers[i] == "A" exactly when i % period == offset: Jamba's placement rule."""
    n = len(layers)
    for period in range(1, n + 2):
        for offset in range(period):
            if all((layers[i] == "A") == (i % period == offset) for i in range(n)):
                return period, offset
    raise ValueError(f"JambaForCausalLM places attention every attn_layer_period layers at one offset; the "
                     f"pattern {layers!r} is not of that form")


def from_config(config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config.json of a model of ``config``; ValueError when JambaForCausalLM cannot hold it."""
    check_family(config, "JambaForCausalLM", layers="AM", ffn="FE")
    problems = []
    if not config.mamba_inner_norms:
        problems.append("Jamba's Mamba layers normalise dt, B and C (needs mamba_inner_norms=True)")
    if "A" in config.layers and config.rope_theta is not None:
        problems.append("Jamba's attention has no positional encoding (needs rope_theta=None)")
    if "A" in config.layers and (config.attn_bias or config.head_dim != config.d_model // config.n_heads):
        problems.append("Jamba's attention has no biases and head_dim = d_model / n_heads")
    if "A" in config.layers and config.sliding_window is not None:
        problems.append("Jamba's attention sees the whole context (needs sliding_window=None)")
    if config.moe_every and (config.moe_normalize_topk or config.n_experts < 2):
        problems.append("Jamba's MoE does not renormalise the top-k weights (needs moe_normalize_topk=False) and "
                        "has at least 2 experts")
    if problems:
        raise ValueError(f"JambaForCausalLM cannot hold this model ({config.summary()}): " + "; ".join(problems))
    period, offset = _attention_period(config.layers)
    return {
        "architectures": list(ARCHITECTURES), "model_type": MODEL_TYPES[0],
        "vocab_size": config.padded_vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "attn_layer_period": period, "attn_layer_offset": offset,
        "expert_layer_period": config.moe_every or 1, "expert_layer_offset": config.moe_offset,
        "num_experts": config.n_experts if config.moe_every else 1, "num_experts_per_tok": config.top_k,
        "router_aux_loss_coef": config.moe_aux_loss_coef,
        "mamba_d_state": config.d_state, "mamba_d_conv": config.d_conv, "mamba_expand": config.expand,
        "mamba_dt_rank": config.dt_rank, "mamba_conv_bias": config.conv_bias, "mamba_proj_bias": config.proj_bias,
        "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
    }

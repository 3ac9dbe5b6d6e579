"""Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``MixtralForCausalLM``: attention blocks with a
gated MLP (Llama, Mistral) or a top-k Mixture-of-Experts with renormalised weights in every layer (Mixtral).

Mistral and Mixtral may attend through a sliding window (``sliding_window`` in config.json, our
``ModelConfig.sliding_window``, the same rule: a query at position i sees keys j with i - j < window); Llama has none.
A model without a window exports as a Llama (or a Mixtral), one with a window as a Mistral (or a Mixtral)."""

from __future__ import annotations

from typing import Any

from hybridlm.config import ModelConfig
from hybridlm.interop.fields import check_activation, check_equal, check_family

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
MODEL_TYPES = ("llama", "mistral", "mixtral")

TABLE = [
    ("embedding.weight", "model.embed_tokens.weight"),
    ("layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mixer.{name}", "model.layers.{i}.self_attn.{name}"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    # Mixtral's experts (w1 gate, w3 up, w2 down) and router, as its checkpoints store them
    ("layers.{i}.ffn.router.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
    ("layers.{i}.ffn.gate_proj", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"),
    ("layers.{i}.ffn.up_proj", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"),
    ("layers.{i}.ffn.down_proj", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
    ("layers.{i}.ffn.{name}", "model.layers.{i}.mlp.{name}"),
    ("norm_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
# Older Llama checkpoints store the rotary frequencies, which we recompute.
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs have rope_theta / rope_scaling at top level.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; hybridlm implements the "
                         f"'default' rotary embedding only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def to_config(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Hugging Face Llama/Mistral/Mixtral config (absent keys take their defaults)."""
    model_type = hf.get("model_type", "llama")
    check_activation(hf, "hidden_act")
    check_equal(hf, "mlp_bias", False, False)
    # transformers' MistralConfig defaults to a window of 4096 (Mistral-7B-v0.1's), MixtralConfig to none;
    # LlamaConfig has no window, and a stray key there is ignored as transformers ignores it
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None) if model_type != "llama" else None
    d_model, n_heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    moe = model_type == "mixtral"
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 32000), pad_vocab_size_multiple=1, d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 32), layers="A", ffn="mlp", d_ff=hf.get("intermediate_size", 14336),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads, rope_theta=_rope_theta(hf),
        attn_bias=hf.get("attention_bias", False), sliding_window=window,
        moe_every=1 if moe else 0, n_experts=hf.get("num_local_experts", 8) if moe else 8,
        top_k=hf.get("num_experts_per_tok", 2) if moe else 2, moe_normalize_topk=True,
        moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01) if moe else 0.01,
        norm_eps=hf.get("rms_norm_eps", 1e-6 if model_type == "llama" else 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02), name=hf.get("_name_or_path") or f"hf-{model_type}",
    )


def from_config(config: ModelConfig) -> dict[str, Any]:
    """Llama's config.json for a Transformer with MLPs (Mistral's with a sliding window), Mixtral's for one with MoE
    in every layer."""
    moe, window = config.moe_every > 0, config.sliding_window
    target = "MixtralForCausalLM" if moe else "LlamaForCausalLM" if window is None else "MistralForCausalLM"
    check_family(config, target, layers="A", ffn="E" if moe else "F")
    if config.rope_theta is None:
        raise ValueError(f"{target} always uses rotary positions; this model has none (rope_theta=None)")
    if moe and not config.moe_normalize_topk:
        raise ValueError("MixtralForCausalLM renormalises the top-k router weights; this model does not "
                         "(moe_normalize_topk=False)")
    if target == "MistralForCausalLM" and config.attn_bias:
        raise ValueError("MistralForCausalLM (the Hugging Face class with a sliding window and an MLP) has no "
                         "attention biases; this model has them (attn_bias=True)")
    out = {
        "architectures": [target], "model_type": target.removesuffix("ForCausalLM").lower(),
        "vocab_size": config.padded_vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta, "attention_bias": config.attn_bias,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
    }
    if moe:
        out.update(num_local_experts=config.n_experts, num_experts_per_tok=config.top_k,
                   router_aux_loss_coef=config.moe_aux_loss_coef, sliding_window=window)
    elif window is not None:
        out.update(sliding_window=window)
    else:
        out.update(mlp_bias=False)
    return out

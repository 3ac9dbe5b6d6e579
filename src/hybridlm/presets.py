"""Named model shapes: the 130M anchors of each family, tiny test variants, and published large models.

The large models are *describe-only*: their shapes let ``hybridlm describe`` reproduce published parameter
counts and KV-cache sizes; they are far too big to instantiate on a laptop.
"""

from __future__ import annotations

from typing import Any

# GPT-NeoX tokenizer used by the Mamba checkpoints: 50277 tokens (Mamba paper, state-spaces/mamba configs).
_NEOX_VOCAB = 50277

# Linear-attention variants (options of the "L" mixer, see hybridlm.layers.linear_attention)
_GLA = dict(feature_map="identity", decay="gla", norm="rms", output_gate=True)
_RETNET = dict(feature_map="identity", decay="fixed", norm="rms", output_gate=True)
_BASED = dict(feature_map="taylor", norm="normalize", short_conv=3)
_LINEAR_TINY = dict(d_model=64, n_layers=2, layers="L", n_heads=4, d_ff=128)

PRESETS: dict[str, dict[str, Any]] = {
    # state-spaces/mamba-130m: d_model 768, 24 layers, d_state 16, d_conv 4, expand 2, vocab padded to a
    # multiple of 8 (50280), tied embeddings; 129,135,360 parameters.
    "mamba-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=24, layers="M", ffn="none"),
    # state-spaces/mamba2-130m: d_state 128, headdim 64, ngroups 1, chunk 256, vocab padded to a multiple
    # of 16 (50288); 128,989,632 parameters.
    "mamba2-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=24, layers="S", ffn="none",
                        pad_vocab_size_multiple=16),
    # A Llama-style Transformer of the same size ("Transformer++" of the Mamba paper's 125M row:
    # 12 layers, d_model 768), same tokenizer, tied embeddings.
    "llama-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=12, layers="A", n_heads=12,
                       d_ff=2048),
    # A Jamba-style hybrid at the same width: two Jamba blocks of 8 layers, attention at offset 4 of each
    # (1:7), MoE every other layer (offset 1), 16 experts top-2, GQA. About 137M parameters are active per
    # token (comparable compute to the 130M models); the experts make the total larger.
    "jamba-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=16, layers="MMMMAMMM", ffn="mlp",
                       moe_every=2, moe_offset=1, n_experts=16, top_k=2, moe_normalize_topk=False,
                       n_heads=12, n_kv_heads=4, d_ff=768, rope_theta=None, mamba_inner_norms=True),
    # Gated linear attention at the Transformer++ 130M shape (12 layers, d_model 768, SwiGLU 2048): GLA's own
    # layout (Yang et al. 2024; flash-linear-attention's GLA configs): 4 heads, keys expand 0.5 (96 a head),
    # values expand 1 (192 a head), no feature map, a low-rank gate per key feature, RMSNorm per head and a SiLU
    # output gate. About 124M parameters, matching mamba-130m's 129M.
    "gla-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=12, layers="L", n_heads=4, head_dim=192,
                     d_ff=2048, mixer_options={"L": _GLA | dict(key_dim=96)}),
    # Based's recipe (Arora et al. 2024, arXiv 2402.18668; HazyResearch/based): its Taylor linear attention (a
    # feature dim of 16 a head: 12 heads at 768, values 64 a head) with a short conv over q/k/v, beside small
    # sliding-window attention (window 64) for local detail; here two linear layers to one windowed, 12 layers.
    "based-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=12, layers="LLA", n_heads=12, d_ff=2048,
                       sliding_window=64, mixer_options={"L": _BASED | dict(key_dim=16)}),
    # Gated linear attention with a full attention layer in every four (1:3), at the same shape.
    "gla-hybrid-130m": dict(vocab_size=_NEOX_VOCAB, d_model=768, n_layers=12, layers="LLLA", n_heads=4,
                            head_dim=192, d_ff=2048, mixer_options={"L": _GLA | dict(key_dim=96)}),
    # Tiny variants with the byte-level tokenizer, for tests and quick experiments. jamba-tiny holds all
    # three mixer kinds so one small model exercises every path of a hybrid.
    "mamba-tiny": dict(d_model=64, n_layers=2, layers="M", ffn="none", d_state=8),
    "mamba2-tiny": dict(d_model=64, n_layers=2, layers="S", ffn="none", mamba2_d_state=16,
                        mamba2_headdim=16, mamba2_chunk_size=16),
    "llama-tiny": dict(d_model=64, n_layers=2, layers="A", n_heads=4, n_kv_heads=2, d_ff=128),
    "jamba-tiny": dict(d_model=64, n_layers=4, layers="MASM", ffn="mlp", moe_every=2, moe_offset=1,
                       n_experts=4, top_k=2, n_heads=4, n_kv_heads=2, d_ff=96, d_state=8,
                       mamba_inner_norms=True, mamba2_d_state=16, mamba2_headdim=16, mamba2_chunk_size=16),
    # One per linear-attention variant: Katharopoulos' elu+1 with the normaliser, Performer's FAVOR+ features,
    # Based's Taylor map with a short conv, RetNet's fixed decay per head, GLA's gate per key feature.
    "linear-tiny": dict(_LINEAR_TINY, mixer_options={"L": dict(feature_map="elu1")}),
    "performer-tiny": dict(_LINEAR_TINY, mixer_options={"L": dict(feature_map="performer", n_features=32)}),
    "based-tiny": dict(_LINEAR_TINY, mixer_options={"L": _BASED | dict(key_dim=8)}),
    "retnet-tiny": dict(_LINEAR_TINY, mixer_options={"L": _RETNET}),
    "gla-tiny": dict(_LINEAR_TINY, mixer_options={"L": _GLA | dict(key_dim=8)}),
    # Reformer's LSH attention (Kitaev et al. 2020), small buckets and chunks so that short tests hash and chunk
    "reformer-tiny": dict(d_model=64, n_layers=2, layers="R", n_heads=4, d_ff=128,
                          mixer_options={"R": dict(n_buckets=4, n_rounds=2, chunk_size=8)}),
    # ----- describe-only shapes of published models -----
    # Llama 2 7B (Touvron et al. 2023; meta-llama/Llama-2-7b-hf config): 6,738,415,616 parameters.
    "llama2-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, layers="A", n_heads=32, d_ff=11008,
                      tie_embeddings=False),
    # Mistral 7B v0.1 (mistralai/Mistral-7B-v0.1 config): GQA 8 KV heads, sliding_window 4096 (so its KV cache
    # stops growing at 4096 tokens; the Jamba paper's Table 1 counts it without the window); 7,241,732,096 parameters.
    "mistral-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, layers="A", n_heads=32, n_kv_heads=8,
                       d_ff=14336, sliding_window=4096, tie_embeddings=False),
    # Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1 config): 8 experts top-2 in every layer, rope theta 1e6;
    # 46.7B total, 12.9B active.
    "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, n_layers=32, layers="A", n_heads=32, n_kv_heads=8,
                         d_ff=14336, moe_every=1, n_experts=8, top_k=2, rope_theta=1e6,
                         tie_embeddings=False),
    # Jamba v0.1 (Lieber et al. 2024, arXiv 2403.19887; ai21labs/Jamba-v0.1 config): 32 layers, attention
    # period 8 offset 4, MoE period 2 offset 1, 16 experts top-2, no positional encoding, dt/B/C norms;
    # 52B total, 12B active.
    "jamba-52b": dict(vocab_size=65536, d_model=4096, n_layers=32, layers="MMMMAMMM", ffn="mlp",
                      moe_every=2, moe_offset=1, n_experts=16, top_k=2, moe_normalize_topk=False,
                      n_heads=32, n_kv_heads=8, d_ff=14336, rope_theta=None, mamba_inner_norms=True,
                      norm_eps=1e-6, tie_embeddings=False),
    # DBRX (Databricks 2024; databricks/dbrx-base config): 40 layers, d_model 6144, 48 heads, 8 KV heads,
    # 16 experts top-4 of hidden size 10752, rope theta 5e5; 132B total, 36B active.
    "dbrx-132b": dict(vocab_size=100352, d_model=6144, n_layers=40, layers="A", n_heads=48, n_kv_heads=8,
                      d_ff=10752, moe_every=1, n_experts=16, top_k=4, rope_theta=5e5, tie_embeddings=False),
}

DESCRIBE_ONLY = frozenset({"llama2-7b", "mistral-7b", "mixtral-8x7b", "jamba-52b", "dbrx-132b"})

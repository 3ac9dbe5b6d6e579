"""Sizes of a model without building it: parameters (total / active), weight bytes, state bytes at a context.

The model is instantiated on PyTorch's ``meta`` device, so the counts come from the very modules that
run (no second, hand-written formula to drift), and a 132B-parameter shape costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.config import MIXER_LETTERS, ModelConfig
from hybridlm.model import HybridLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Description:
    config: ModelConfig
    total_params: int
    active_params: int
    dtype: str
    weight_bytes: int
    context: int
    batch: int
    state_bytes: dict[str, int]  # by mixer kind, at `context` tokens for `batch` sequences
    state_names: dict[str, str]  # what each kind's state is: "KV cache", "KV cache (ring buffer of 4096 positions)",
    # "conv + SSM state (fixed size)"

    @property
    def state_total(self) -> int:
        return sum(self.state_bytes.values())


def describe(config: ModelConfig, context: int = 2048, dtype: str = "bf16", batch: int = 1) -> Description:
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if context < 0 or batch < 1:
        raise ValueError(f"context/batch: expected context >= 0 and batch >= 1, got {context}, {batch}")
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = HybridLM(config)
    state = model.init_state(batch, max_len=context, device="meta", dtype=torch_dtype)
    total = model.num_parameters()
    return Description(
        config=config, total_params=total, active_params=model.num_parameters(active=True), dtype=dtype,
        weight_bytes=total * torch_dtype.itemsize, context=context, batch=batch, state_bytes=state.nbytes(),
        state_names={kind: layer.description for kind, layer in zip(state.kinds, state.layers, strict=True)},
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_description(d: Description) -> str:
    c = d.config
    lines = [
        f"{c.name}  ({c.family})",
        f"  layers        {c.layers}   ({', '.join(f'{k} {v.label}' for k, v in MIXER_LETTERS.items())})",
        f"  feed-forward  {c.ffn_pattern}   (- none, F gated MLP, E MoE {c.n_experts} experts top-{c.top_k})"
        if c.moe_every else f"  feed-forward  {c.ffn_pattern}   (- none, F gated MLP)",
        f"  d_model {c.d_model}, vocab {c.vocab_size} (padded {c.padded_vocab_size}), "
        f"{'tied' if c.tie_embeddings else 'untied'} embeddings",
        f"  parameters    {d.total_params:,} total, {d.active_params:,} active per token",
        f"  weights       {human_bytes(d.weight_bytes)} in {d.dtype}",
        f"  state at {d.context:,} tokens, batch {d.batch} ({d.dtype} KV / conv, fp32 recurrent state):",
    ]
    width = max(len(kind) for kind in [*d.state_bytes, "total"])
    for kind, n in sorted(d.state_bytes.items()):
        lines.append(f"    {kind:<{width}} {human_bytes(n):>12}   {d.state_names[kind]}")
    lines.append(f"    {'total':<{width}} {human_bytes(d.state_total):>12}")
    return "\n".join(lines)

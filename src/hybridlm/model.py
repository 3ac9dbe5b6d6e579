"""HybridLM: embedding -> blocks (mixer + optional feed-forward, pre-norm residual) -> norm -> head.

A Transformer, a Mamba and a Jamba-style hybrid are the same class with different ``config.layers``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm import generation
from hybridlm.checkpoint import DEFAULT_MAX_SHARD_SIZE
from hybridlm.config import ModelConfig
from hybridlm.decode import decode_step, is_decode_step
from hybridlm.huge_pages import place_parameters
from hybridlm.interop import load_checkpoint, save_checkpoint
from hybridlm.layers import FEED_FORWARDS, MIXERS, MoE, RMSNorm
from hybridlm.layers.linear import Linear
from hybridlm.state import InferenceState


@dataclass
class ModelOutput:
    """``logits`` (b, l, padded_vocab); ``loss``: next-token cross-entropy (None without labels);
    ``aux_loss``: MoE load-balancing loss summed over MoE layers (0 without MoE; ~1.0 per layer at a
    uniform router). A training objective is ``loss + config.moe_aux_loss_coef * aux_loss``."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


class Block(nn.Module):
    """``x += mixer(norm(x), state)``; then, when the layer has one, ``x += ffn(ffn_norm(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MIXERS[config.layers[layer_idx]](config, layer_idx)
        kind = config.ffn_kind(layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps) if kind != "none" else None
        self.ffn = FEED_FORWARDS[kind](config) if kind != "none" else None

    def forward(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (b, l, d_model) -> (b, l, d_model), aux loss of the feed-forward (None unless MoE)
        return self._feed_forward(x + self.mixer(self.norm(x), state, mask), mask)

    def step(self, x: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (b, 1, d_model) -> (b, 1, d_model): one decode step through the modules (``hybridlm.decode`` picks it)
        return self._feed_forward(x + self.mixer.step(self.norm(x), state), None)

    def _feed_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.ffn is None:
            return x, None
        y, aux = self.ffn(self.ffn_norm(x), mask)
        return x + y, aux


class HybridLM(nn.Module):
    """A language model of any of the three families, described entirely by its ``ModelConfig``."""

    # A prompt longer than this, run with a ``state`` and without labels, is processed in pieces of this many
    # tokens carrying the state: activations stay bounded (a 256K-token prompt fits in a few GiB).
    prefill_chunk: int = 8192

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()
        place_parameters(self)  # decode streams the weights every token: huge pages spare it most TLB misses

    # ------------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for embeddings and projections (GPT-2 / Llama), residual output
        projections scaled by 1/sqrt(2 n_layers) (GPT-2), then each SSM mixer's published initialisation."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        residual_outputs = {"out_proj", "o_proj", "down_proj"}
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=std)
                elif isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, MoE):
                    nn.init.normal_(module.gate_proj, std=std)
                    nn.init.normal_(module.up_proj, std=std)
                    nn.init.normal_(module.down_proj, std=residual_std)
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in residual_outputs:
                    nn.init.normal_(module.weight, std=residual_std)
                if hasattr(module, "reset_ssm_parameters"):
                    module.reset_ssm_parameters()

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: InferenceState | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model on ``input_ids`` (b, l).

        ``labels`` (b, l): targets aligned with the inputs (typically the inputs themselves); position t
        is scored on predicting ``labels[:, t + 1]``; -100 is ignored. ``state``: filled by a prefill and
        advanced by later calls (one token at a time for decoding). ``attention_mask`` (b, l): 1 for real
        tokens, 0 for left padding, which then touches neither the KV cache positions nor the SSM states.
        ``logits_to_keep``: compute logits for only the last n positions (0: all).
        """
        self._check_inputs(input_ids, attention_mask, state)
        if state is not None and labels is None and input_ids.shape[1] > self.prefill_chunk:
            return self._prefill_in_chunks(input_ids, state, attention_mask, logits_to_keep)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
        if is_decode_step(input_ids, state, mask, labels):
            logits, aux_loss = decode_step(self, state, input_ids)
            state.seqlen += 1
            return ModelOutput(logits=logits, loss=None, aux_loss=aux_loss)
        x = self.embedding(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            x, aux = block(x, None if state is None else state.layers[i], mask)
            if aux is not None:
                aux_loss = aux_loss + aux
        if state is not None:
            state.seqlen += input_ids.shape[1]
        x = self.norm_f(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels: a loss needs logits for every position; use logits_to_keep=0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def _prefill_in_chunks(self, input_ids: torch.Tensor, state: InferenceState,
                           attention_mask: torch.Tensor | None, logits_to_keep: int) -> ModelOutput:
        # input_ids: (b, l) -> the logits of the last logits_to_keep positions (all when 0), as one call would give
        length, chunk = input_ids.shape[1], self.prefill_chunk
        keep = length if logits_to_keep == 0 else min(logits_to_keep, length)
        logits, aux_loss = [], None
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            wanted = max(0, end - max(start, length - keep))  # positions of this piece among the kept ones
            out = self.forward(input_ids[:, start:end], state=state, logits_to_keep=max(wanted, 1),
                               attention_mask=None if attention_mask is None else attention_mask[:, start:end])
            if wanted:
                logits.append(out.logits)
            aux_loss = out.aux_loss if aux_loss is None else aux_loss + out.aux_loss
        return ModelOutput(logits=torch.cat(logits, 1), loss=None, aux_loss=aux_loss)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      state: InferenceState | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids: expected an integer tensor of shape (batch, length), "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: expected at least one token per sequence, got length 0")
        if input_ids.numel():
            low, high = map(int, torch.aminmax(input_ids))  # one pass: this runs before every decoded token
            if not 0 <= low <= high < self.config.padded_vocab_size:
                raise ValueError(f"input_ids: expected token ids in [0, {self.config.padded_vocab_size}), got values "
                                 f"in [{low}, {high}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (as input_ids), "
                             f"got {tuple(attention_mask.shape)}")
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state: made for batch size {state.batch_size}, got input_ids of batch size "
                             f"{input_ids.shape[0]}")

    # -------------------------------------------------------------------------------- inference state
    def init_state(self, batch_size: int, max_len: int = 0, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> InferenceState:
        """Empty inference state for ``batch_size`` sequences. ``max_len`` preallocates KV caches (they
        grow when exceeded); SSM states are fixed-size whatever the length."""
        param = self.embedding.weight
        device = param.device if device is None else torch.device(device)
        dtype = dtype or param.dtype
        layers = [block.mixer.init_state(batch_size, device=device, dtype=dtype, max_len=max_len)
                  for block in self.layers]
        return InferenceState(layers, [block.mixer.kind for block in self.layers], batch_size)

    # ------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` generated tokens, (b, l + n). See ``generation.generate``."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (b,), one step at a time. See ``generation.stream``."""
        return generation.stream(self, input_ids, max_new_tokens, **kwargs)

    # -------------------------------------------------------------------------------------- counting
    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (tied weights once). ``active=True``: those used per token, i.e. MoE experts
        counted at top_k / n_experts."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for module in self.modules():
            if isinstance(module, MoE):
                expert = sum(p.numel() for p in module.expert_parameters())
                total -= expert - expert * module.top_k // module.n_experts
        return total

    # ----------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, path: str | Path, tokenizer=None, format: str = "hybridlm",
                        dtype: torch.dtype | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> str:
        """Write the model to directory ``path`` (atomically) in ``format``: "hybridlm" (``config.json`` and
        ``model.safetensors``, sharded above ``max_shard_size`` bytes), "hf" (the Hugging Face class of its family) or
        a layout of ``hybridlm.interop.FORMATS``; with the tokenizer's files, if given. Float tensors are cast to
        ``dtype`` when given. Returns the format written."""
        return save_checkpoint(self, path, format, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", format: str | None = None,
                        dtype: torch.dtype | None = None) -> HybridLM:
        """Load a checkpoint directory: ours (written by ``save_pretrained``) or any layout ``hybridlm.interop``
        reads (Hugging Face Mamba/Mamba2/Llama/Mistral/Mixtral/Jamba, official mamba_ssm), detected from its
        ``config.json`` unless ``format`` names it."""
        return load_checkpoint(path, cls, format=format, device=device, dtype=dtype)

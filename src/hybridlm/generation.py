"""Sampling and the decode loop: one prefill of the prompt, then one token per step through the state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybridlm.model import HybridLM


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    # logits: (b, v) -> (b, v) with everything outside the top-k / nucleus set to -inf
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p. The first always stays, also for a top_p
        # below float32's smallest number (5e-324 becomes 0, and 0 >= 0 would drop every token).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generators: list[torch.Generator] | None) -> torch.Tensor:
    # logits: (b, v) float -> next tokens (b,). Any temperature >= 0 is safe: the logits are shifted so that their
    # largest is 0 before dividing, so a tiny temperature (1e-40) sends the others to -inf, not every logit to inf
    # (inf - inf is NaN); one that is 0 in float32 (1e-320) is greedy.
    if float(torch.tensor(temperature, dtype=torch.float32)) == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # A spread wider than float32 makes the shift -inf, and -inf over a temperature that is inf in float32 is NaN:
    # keep the shift finite (at an infinite temperature every token is then equally likely).
    shifted = (logits - logits.amax(-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).min)
    probs = filter_logits(shifted / temperature, top_k, top_p).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    # One generator per sequence: a sequence's tokens depend on its seed, not on its batch neighbours.
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)])


def _check_args(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape (batch, length >= 1), got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1] or None, got {top_p!r}")


@torch.no_grad()
def stream(
    model: HybridLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each sequence, shape (b,), until ``max_new_tokens`` or every sequence stopped.

    ``temperature=0`` is greedy decoding. ``seed`` seeds one generator per sequence, so a prompt gives the
    same tokens alone or in a batch. A sequence stops at any of ``eos_token_id`` (that token is yielded);
    after that it yields ``pad_token_id``. Prompts of different lengths are left-padded, with
    ``attention_mask`` 0 on the padding.
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    batch = input_ids.shape[0]
    stop_ids = torch.tensor([] if eos_token_id is None else
                            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                            dtype=torch.long, device=input_ids.device)
    generators = None
    if seed is not None:
        generators = [torch.Generator(device=input_ids.device).manual_seed(seed) for _ in range(batch)]
    vocab = model.config.vocab_size
    state = model.init_state(batch, max_len=input_ids.shape[1] + max_new_tokens)
    logits = model(input_ids, state=state, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits[:, vocab:] = float("-inf")  # embedding rows added by vocab padding are never sampled
        sampled = sample(logits, temperature, top_k, top_p, generators)
        token = sampled.masked_fill(finished, pad_token_id)
        yield token
        finished |= torch.isin(token, stop_ids)
        if bool(finished.all()):
            return
        # Finished rows keep decoding their own samples (never the pad id, which may not be a valid
        # input); their outputs are discarded.
        logits = model(sampled[:, None], state=state, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def generate(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by the generated tokens, (b, l + n), n <= max_new_tokens (see ``stream``)."""
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids.clone()

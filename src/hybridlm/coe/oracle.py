"""The oracle: which expert is best on a prompt, measured by its loss on a reference completion.

An expert's loss on a record is its mean per-token cross-entropy (nats) on the completion's tokens given the
prompt, both tokenized by the expert's own tokenizer (prompt and completion separately, then joined, so the
scored tokens are exactly the completion's). The oracle label is the expert with the lowest loss. With
tokenizers of different granularity per-token losses are not on one scale (a byte costs less than a word);
that is the issue's definition, kept, and the experts of the demo share one tokenizer kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hybridlm.data.records import Record, RecordError, read_records
from hybridlm.data.tasks import IGNORE
from hybridlm.evaluate import score
from hybridlm.model import HybridLM


@dataclass(frozen=True)
class Example:
    """A prompt with either a given expert label or a completion to compute the oracle's label from."""

    prompt: str
    expert: str | None = None
    completion: str | None = None
    where: str = ""


def read_examples(path: str, require_completion: bool = False, argument: str = "--data") -> list[Example]:
    """The records of ``path`` as examples: each needs ``prompt`` and ``expert`` or ``completion``."""
    try:
        records = read_records(path)
    except (RecordError, FileNotFoundError) as e:
        raise ValueError(f"{argument}: {e}") from None
    return [_example(record, require_completion, argument) for record in records]


def _example(record: Record, require_completion: bool, argument: str) -> Example:
    fields = record.fields
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{argument}: {record.error('prompt', f'expected a non-empty string, got {prompt!r}')}")
    expert, completion = fields.get("expert"), fields.get("completion")
    if completion is not None and (not isinstance(completion, str) or not completion):
        message = f"expected a non-empty string, got {completion!r}"
        raise ValueError(f"{argument}: {record.error('completion', message)}")
    if expert is not None and not isinstance(expert, str):
        raise ValueError(f"{argument}: {record.error('expert', f'expected an expert name, got {expert!r}')}")
    if require_completion and completion is None:
        raise ValueError(f"{argument}: {record.where}: needs a 'completion' (quality is a loss on it)")
    if expert is None and completion is None:
        raise ValueError(f"{argument}: {record.where}: expected a record with 'expert' (a label) or 'completion' "
                         f"(the oracle labels it), got fields {sorted(fields)}")
    return Example(prompt, expert, completion, record.where)


def completion_loss(model: HybridLM, tokenizer: Any, prompt: str, completion: str) -> float:
    """Mean per-token loss (nats) of ``completion`` given ``prompt``, in the expert's own tokens."""
    prompt_ids, completion_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
    if not prompt_ids or not completion_ids:
        raise ValueError(f"completion_loss: the prompt or completion has no tokens ({prompt!r}, {completion!r})")
    ids = torch.tensor([prompt_ids + completion_ids])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = IGNORE  # only the completion is scored
    return score(model, [(ids, labels)]).loss


def loss_table(experts: Sequence[tuple[Any, Any]], examples: Sequence[Example]) -> torch.Tensor:
    # experts: n (model, tokenizer) pairs, examples with completions -> (len(examples), n) losses in nats
    return torch.tensor([[completion_loss(model, tokenizer, e.prompt, e.completion) for model, tokenizer in experts]
                         for e in examples], dtype=torch.float64)


def oracle_labels(losses: torch.Tensor) -> list[int]:
    # losses: (n_examples, n_experts) -> the lowest-loss expert of each example (the first on a tie)
    return losses.argmin(-1).tolist()

"""Scoring a model: loss and accuracy on labelled batches, task accuracy at any length, perplexity on text."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.data.tasks import IGNORE, Task
from hybridlm.model import HybridLM


@dataclass
class Score:
    loss: float  # mean cross-entropy over the scored positions (nats)
    accuracy: float  # fraction of scored positions whose argmax prediction is right
    n: int  # scored positions

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


@torch.no_grad()
def score(model: HybridLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Score:
    """Loss and accuracy over ``(input_ids, labels)`` batches (labels aligned with inputs, ``IGNORE`` unscored)."""
    was_training = model.training
    model.eval()
    device = model.embedding.weight.device
    total, correct, n = 0.0, 0, 0
    vocab = model.config.vocab_size
    try:
        for input_ids, labels in batches:
            input_ids, labels = input_ids.to(device), labels.to(device)
            logits = model(input_ids).logits[:, :-1, :vocab].float()  # padded vocab rows are never answers
            target = labels[:, 1:]
            keep = target != IGNORE
            if not bool(keep.any()):
                continue
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == target[keep]).sum())
            n += int(keep.sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("score: the batches hold no scored positions")
    return Score(loss=total / n, accuracy=correct / n, n=n)


def task_accuracy(model: HybridLM, task: Task, length: int, n_samples: int = 64, batch_size: int = 16,
                  seed: int = 1234) -> Score:
    """Accuracy (and loss) on the answers of ``n_samples`` fresh sequences of ``length`` tokens of ``task`` (of
    ``task.scored_task()``: a task trained on a mix of difficulties is scored at its hardest)."""
    task = task.scored_task()
    if task.vocab_size > model.config.vocab_size:
        raise ValueError(f"task {task.name!r} uses {task.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size} (vocab_size)")

    def batches():
        for i, start in enumerate(range(0, n_samples, batch_size)):
            b = task.sample(min(batch_size, n_samples - start), length, np.random.default_rng([seed, length, i]))
            yield b.input_ids, b.labels

    return score(model, batches())


def perplexity(model: HybridLM, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
               max_windows: int | None = None) -> Score:
    """Cross-entropy / perplexity over consecutive non-overlapping windows of ``seq_len`` tokens of ``tokens``."""
    if len(tokens) < seq_len:
        raise ValueError(f"seq_len: {seq_len} is longer than the data ({len(tokens):,} tokens)")
    if int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"data: token id {int(tokens.max())} is outside the model's vocabulary of "
                         f"{model.config.vocab_size} (was it tokenised with the model's tokenizer?)")
    starts = np.arange(0, len(tokens) - seq_len + 1, seq_len)[:max_windows]

    def batches():
        for i in range(0, len(starts), batch_size):
            ids = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64)
                                             for s in starts[i : i + batch_size]]))
            yield ids, ids

    return score(model, batches())

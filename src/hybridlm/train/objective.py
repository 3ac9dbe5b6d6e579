"""What a training step minimises. The trainer asks its objective for a micro-batch's loss and metrics, and for
the held-out metrics; pre-training and SFT minimise the next-token loss, DPO and its relatives a preference loss
(``train.preference``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from hybridlm.evaluate import score
from hybridlm.model import HybridLM


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to backpropagate and the micro-batch's metrics (detached scalars; ``loss`` among them)."""
        ...

    def evaluate(self, model: HybridLM, batches: Iterable[Any]) -> dict[str, float]:
        """Metrics over held-out batches, named ``eval_*``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the losses depend on: compared when a run resumes."""
        ...


class NextTokenLoss:
    """Cross-entropy of each labelled next token (labels -100 are not scored), plus the MoE balance loss."""

    def __init__(self, aux_loss_coef: float) -> None:
        self.aux_loss_coef = aux_loss_coef

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, labels = batch
        out = model(input_ids, labels=labels)
        return out.loss + self.aux_loss_coef * out.aux_loss, {"loss": out.loss.detach().float()}

    def evaluate(self, model: HybridLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        s = score(model, batches)
        return {"eval_loss": s.loss, "eval_accuracy": s.accuracy, "eval_perplexity": s.perplexity}

    def describe(self) -> dict[str, Any]:
        return {"kind": "next_token"}


def batch_to(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor tuple or named tuple of tensors) on ``device``."""
    if hasattr(batch, "to"):
        return batch.to(device)
    return type(batch)(t.to(device) for t in batch)

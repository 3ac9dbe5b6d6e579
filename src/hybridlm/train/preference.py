"""The preference objective (DPO and relatives) and where its reference log-probs come from.

A step runs the policy on the 2n rows of a ``PreferenceBatch`` (chosen rows, then rejected), sums each row's
log-probs over its completion tokens, and takes the reference's sums from one of:

- ``FrozenReference``: a frozen copy of the starting model, run on every batch (two models in memory);
- ``PrecomputedReference``: the starting model's sums for every pair, computed once before training (one model);
- ``AdapterReference``: with LoRA, the same model with its adapter disabled (the base weights).

Metrics carry TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (and ``aux_loss`` for MoE models).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.data.preference_source import IGNORE, PreferenceBatch
from hybridlm.train.preference_losses import PreferenceLoss

FLAT_STEPS = 20  # micro-batches with the policy still equal to the reference before warning that nothing learns


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens, how many there are, and the MoE balance loss.

    input_ids, labels: (rows, l) -> sums (rows,) float32, counts (rows,), aux_loss ()"""
    out = model(input_ids)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    target = labels[:, 1:]
    scored = target != IGNORE
    token_logps = -F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")  # (rows, l-1)
    return (token_logps * scored).sum(1), scored.sum(1), out.aux_loss


class Reference(Protocol):
    def logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """The reference's summed completion log-probs of the batch's 2n rows."""
        ...


class FrozenReference:
    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> torch.Tensor:
        return sequence_logps(self.model, batch.input_ids, batch.labels)[0]


class AdapterReference:
    """The base model under a peft adapter: the policy with its adapter disabled."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.model = peft_model

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch.input_ids, batch.labels)[0]
        finally:
            self.model.train(was_training)


class PrecomputedReference:
    """Reference sums for every pair of a source, computed once with ``model`` (the starting policy)."""

    def __init__(self, model: nn.Module, batches: Iterable[PreferenceBatch], device: torch.device) -> None:
        self.table: dict[tuple[int, int], torch.Tensor] = {}  # (held_out, pair) -> (chosen, rejected) sums
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = batch.to(device)
                    sums = sequence_logps(model, batch.input_ids, batch.labels)[0]
                    n = len(batch.pair_index)
                    for j, index in enumerate(batch.pair_index.tolist()):
                        self.table[int(batch.held_out), index] = torch.stack([sums[j], sums[n + j]])
        finally:
            model.train(was_training)

    def logps(self, batch: PreferenceBatch) -> torch.Tensor:
        held_out = int(batch.held_out)
        pairs = torch.stack([self.table[held_out, i] for i in batch.pair_index.tolist()])  # (n, 2)
        return torch.cat([pairs[:, 0], pairs[:, 1]]).to(batch.input_ids.device)


class PreferenceObjective:
    """``loss`` over a batch of pairs, with ``reference`` (None for SimPO and ORPO)."""

    def __init__(self, loss: PreferenceLoss, reference: Reference | None, aux_loss_coef: float = 0.0,
                 reference_kind: str | None = None) -> None:
        if loss.needs_reference and reference is None:
            raise ValueError(f"loss {loss.kind!r} needs a reference model")
        self.loss, self.reference, self.aux_loss_coef = loss, reference, aux_loss_coef
        self.reference_kind = reference_kind
        self._flat_calls, self._warned = 0, False

    def compute(self, model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(batch.pair_index)
        sums, counts, aux = sequence_logps(model, batch.input_ids, batch.labels)
        ref = self.reference.logps(batch) if self.loss.needs_reference else None
        losses, rewards_c, rewards_r = self.loss(sums[:n], sums[n:], counts[:n], counts[n:],
                                                 None if ref is None else ref[:n], None if ref is None else ref[n:])
        loss = losses.mean()
        if self.loss.sft_weight:
            loss = loss + self.loss.sft_weight * self.loss.sft_loss(sums[:n], counts[:n])
        metrics = {"loss": loss.detach(), "rewards/chosen": rewards_c.mean(), "rewards/rejected": rewards_r.mean(),
                   "rewards/accuracies": (rewards_c > rewards_r).float().mean(),
                   "rewards/margins": (rewards_c - rewards_r).mean(),
                   "logps/chosen": sums[:n].detach().mean(), "logps/rejected": sums[n:].detach().mean()}
        if self.aux_loss_coef:
            metrics["aux_loss"] = aux.detach().float()
        return loss + self.aux_loss_coef * aux, metrics

    def __call__(self, model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.compute(model, batch)
        self._check_learning(metrics)
        return loss, metrics

    def _check_learning(self, metrics: dict[str, torch.Tensor]) -> None:
        # A policy that never leaves the reference has zero margins: the DPO loss sits at ln 2 (e.g. LoRA aimed at
        # modules the forward never calls, or a learning rate of ~0).
        if self._warned or not self.loss.needs_reference:
            return
        still = abs(float(metrics["rewards/margins"])) < 1e-6 and abs(float(metrics["rewards/chosen"])) < 1e-6
        self._flat_calls = self._flat_calls + 1 if still else 0
        if self._flat_calls >= FLAT_STEPS:
            self._warned = True
            warnings.warn(f"preference loss: the policy has not moved from the reference in {FLAT_STEPS} "
                          f"micro-batches (loss {float(metrics['loss']):.4f}; ln 2 = {math.log(2):.4f} for sigmoid): "
                          f"nothing is learning. Check the learning rate and that the trained parameters (LoRA "
                          f"targets) are used by the forward pass", stacklevel=3)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[PreferenceBatch]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        n = 0
        device = next(model.parameters()).device
        try:
            for batch in batches:
                pairs = len(batch.pair_index)
                _, metrics = self.compute(model, batch.to(device))
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * pairs
                n += pairs
        finally:
            model.train(was_training)
        if n == 0:
            raise ValueError("eval: no held-out preference pairs")
        return {f"eval_{name}": total / n for name, total in totals.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "preference", "loss": self.loss.kind, "beta": self.loss.beta,
                "label_smoothing": self.loss.label_smoothing, "simpo_gamma": self.loss.simpo_gamma,
                "reference": self.reference_kind}

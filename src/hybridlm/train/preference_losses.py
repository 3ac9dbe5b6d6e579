"""Preference losses over sequence log-probabilities: DPO and its relatives, as TRL defines them.

Inputs per pair: the policy's summed completion log-probs of the chosen and rejected sequences (``chosen``,
``rejected``), their completion lengths, and (for the losses with a reference) the reference model's sums.
With the log-ratios r_c = chosen - ref_chosen, r_r = rejected - ref_rejected and Δ = r_c - r_r:

- ``sigmoid`` (DPO, Rafailov et al. 2023): -log σ(βΔ)
- ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 - βΔ)
- ``ipo`` (Azar et al. 2023, eq. 17): (r_c/|y_c| - r_r/|y_r| - 1/(2β))², length-normalised as TRL does
- ``robust`` (Chowdhury et al. 2024, label smoothing ε): (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)
- ``simpo`` (Meng et al. 2024, no reference): -log σ(β(a_c - a_r) - γ), a = mean log-prob per token
- ``orpo`` (Hong et al. 2024, no reference): -a_c + β·(-log σ(log odds(y_c) - log odds(y_r))),
  odds(y) = p/(1-p) with p = exp(a); the first term is the SFT loss on the chosen completion.

``sft_weight`` w adds w times the chosen completions' mean token NLL to any of them (RPO, Pang et al. 2024,
"Iterative Reasoning Preference Optimization"; TRL: ``loss_type=[kind, "sft"]``, ``loss_weights=[1, w]``): DPO alone
can lower the chosen completions' likelihood with the rejected ones', and the NLL keeps it up.

Rewards (TRL's ``rewards/*``): β·r for the losses with a reference, β·a for SimPO and ORPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss and its hyperparameters; ``__call__`` gives the per-pair losses and rewards."""

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust only
    simpo_gamma: float = 0.5  # simpo only: the target reward margin γ
    sft_weight: float = 0.0  # w · mean NLL of the chosen tokens, added to the batch's loss (RPO)

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {self.kind!r}")
        if not self.beta > 0:
            raise ValueError(f"beta: expected a positive number, got {self.beta!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing!r}")
        if not (isinstance(self.sft_weight, int | float) and self.sft_weight >= 0):
            raise ValueError(f"sft_weight: expected a number >= 0, got {self.sft_weight!r}")
        if self.label_smoothing and self.kind != "robust":
            raise ValueError(f"label_smoothing: only the robust loss uses it, not {self.kind!r}")

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor,
                 rejected_len: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                 ref_rejected: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # all (n,) float -> per-pair loss (n,), chosen rewards (n,), rejected rewards (n,)
        beta = self.beta
        mean_c, mean_r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        if not self.needs_reference:
            if self.kind == "simpo":
                loss = -F.logsigmoid(beta * (mean_c - mean_r) - self.simpo_gamma)
            else:  # orpo; log(1 - p) = log(-expm1(a)) stays finite as p -> 1
                log_odds = (mean_c - mean_r) - (torch.log(-torch.expm1(mean_c)) - torch.log(-torch.expm1(mean_r)))
                loss = -mean_c - beta * F.logsigmoid(log_odds)
            return loss, beta * mean_c.detach(), beta * mean_r.detach()
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss {self.kind!r} needs the reference model's log-probs")
        ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
        delta = ratio_c - ratio_r
        if self.kind == "sigmoid":
            loss = -F.logsigmoid(beta * delta)
        elif self.kind == "hinge":
            loss = torch.relu(1 - beta * delta)
        elif self.kind == "ipo":
            loss = (ratio_c / chosen_len.clamp(min=1) - ratio_r / rejected_len.clamp(min=1) - 1 / (2 * beta)) ** 2
        else:  # robust
            eps = self.label_smoothing
            loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        return loss, beta * ratio_c.detach(), beta * ratio_r.detach()

    def sft_loss(self, chosen: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
        """The batch's mean NLL per chosen completion token, as TRL's ``sft`` loss: (n,), (n,) -> ()"""
        return -chosen.sum() / chosen_len.sum().clamp(min=1)

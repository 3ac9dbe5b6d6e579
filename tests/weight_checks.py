"""Comparing the weights of two training runs that should agree up to floating-point summation order."""

import torch


def assert_adam_weights_match(run_a: torch.nn.Module, run_b: torch.nn.Module, lr: float, steps: int) -> None:
    """Every parameter of ``run_a`` equals ``run_b``'s but for rare Adam outliers.

    Adam divides each gradient element by its own running RMS: where an element's gradient is near 0, a different
    summation order (an all-reduce of two halves, a reduce-scatter) can move its update by up to ``lr`` a step.
    Seen on one Intel Xeon: 1.6e-4 on 1 of 16,896 elements after 4 steps at lr 3e-3, in the DDP and the FSDP runs
    alike; on AMD EPYC 3.7e-6. So nearly every element must be equal, and none further apart than Adam can move it.
    A run that did not average the gradients (or averaged the wrong ones) moves most elements."""
    for (name, a), b in zip(run_a.named_parameters(), run_b.parameters(), strict=True):
        off = ~torch.isclose(a, b, rtol=1e-4, atol=2e-5)
        assert off.sum().item() <= max(1, a.numel() // 1000), f"{name}: {off.sum().item()} of {a.numel()} differ"
        assert (a - b).abs().max().item() <= lr * steps, f"{name}: {(a - b).abs().max().item()} > {lr * steps}"

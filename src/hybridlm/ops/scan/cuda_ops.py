"""The official CUDA selective scan (``mamba_ssm``), adapted to our contract; used only when installed.

Not exercised by the CPU test suite: mamba_ssm needs a CUDA build of torch and a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from hybridlm.ops.scan.reference import selective_scan_reference


def mamba_ssm_available() -> bool:
    """True when the ``mamba_ssm`` package is importable (it ships the CUDA kernels)."""
    return importlib.util.find_spec("mamba_ssm") is not None


def selective_scan_mamba_ssm(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None):
    # x, dt, z: (b, l, d)   A: (d, n)   B, C: (b, l, n)  -> y: (b, l, d), final_state: (b, d, n) float32
    if initial_state is not None:  # mamba_ssm's selective_scan_fn takes no initial state
        return selective_scan_reference(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    y, last = selective_scan_fn(
        x.transpose(1, 2), dt.transpose(1, 2), A.float(), B.transpose(1, 2), C.transpose(1, 2),
        None if D is None else D.float(), None if z is None else z.transpose(1, 2),
        None if dt_bias is None else dt_bias.float(), dt_softplus, return_last_state=True)
    return y.transpose(1, 2).to(x.dtype), last.to(torch.promote_types(x.dtype, torch.float32))

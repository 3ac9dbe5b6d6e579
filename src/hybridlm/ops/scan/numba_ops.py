"""Mamba-1 selective scan on CPU: one fused numba loop forward and backward (same contract as the reference).

Work is split over (batch, block of ``_W`` channels) with ``prange``. Inside a block the loop runs over time
and keeps the block's (d_state, _W) state in L1; the innermost loop runs over the _W neighbouring channels,
which are contiguous in the (b, l, d) layout, so the compiler turns it into SIMD code, exp included (see
``fast_math.vexp``). Every loop over channels runs exactly _W times (d_inner is zero-padded to a multiple of
_W when needed; padded channels have x = A = 0 and stay inert): a fixed trip count made the forward 2-3x
faster here than loops of ``min(_W, d_inner - d0)`` steps. No (batch, length, d_inner, d_state) tensor is
ever built:

- forward writes only y, the final state and, when a gradient is needed, the state every ``_K`` steps;
- backward walks the chunks of ``_K`` steps from the end, recomputes each chunk's states from its
  checkpoint into a small buffer, then runs the adjoint recurrence
      g_t = C_t ds_t + exp(dt_{t+1} A) g_{t+1}        (g_t = dLoss/dh_t, per channel, (d_state,))
  accumulating dx, d(dt), dA, dB, dC, dD and the gradient of the initial state.

dt's bias and softplus, the D skip and the SiLU(z) gate are part of the autograd Function; softplus runs
in torch (vectorised log1p), everything else inside the kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from hybridlm.ops.fast_math import vexp

_W = 16  # channels per block: one 512-bit vector of float32
_K = 64  # steps between state checkpoints kept for the backward pass


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz"})
def _scan_fwd(x, delta, A, B, C, D, z, h0, y, h_out, ckpt, has_z):  # pragma: no cover - compiled
    # x, delta, z, y: (b, l, d)  A: (d, n)  B, C: (b, l, n)  D: (d,)  h0, h_out: (b, d, n)
    # ckpt: (b, n_ckpt, d, n) state entering steps 0, K, 2K, ... (n_ckpt = 0: not kept)
    batch, length, d_inner = x.shape
    n_state = A.shape[1]
    n_blocks = (d_inner + _W - 1) // _W
    n_ckpt = ckpt.shape[1]
    one = np.ones(1, dtype=x.dtype)[0]
    for task in prange(batch * n_blocks):
        b = task // n_blocks
        d0 = (task % n_blocks) * _W
        h = np.zeros((n_state, _W), dtype=x.dtype)
        At = np.zeros((n_state, _W), dtype=x.dtype)
        dx = np.zeros(_W, dtype=x.dtype)
        dl = np.zeros(_W, dtype=x.dtype)
        acc = np.zeros(_W, dtype=x.dtype)
        for n in range(n_state):
            for c in range(_W):
                h[n, c] = h0[b, d0 + c, n]
                At[n, c] = A[d0 + c, n]
        for t in range(length):
            if n_ckpt and t % _K == 0:
                for n in range(n_state):
                    for c in range(_W):
                        ckpt[b, t // _K, d0 + c, n] = h[n, c]
            for c in range(_W):
                dl[c] = delta[b, t, d0 + c]
                dx[c] = dl[c] * x[b, t, d0 + c]
                acc[c] = D[d0 + c] * x[b, t, d0 + c]
            for n in range(n_state):
                Bn = B[b, t, n]
                Cn = C[b, t, n]
                for c in range(_W):
                    hn = vexp(dl[c] * At[n, c]) * h[n, c] + dx[c] * Bn
                    h[n, c] = hn
                    acc[c] += Cn * hn
            if has_z:
                for c in range(_W):
                    zc = z[b, t, d0 + c]
                    acc[c] *= zc / (one + vexp(-zc))
                for c in range(_W):
                    y[b, t, d0 + c] = acc[c]
            else:
                for c in range(_W):
                    y[b, t, d0 + c] = acc[c]
        for n in range(n_state):
            for c in range(_W):
                h_out[b, d0 + c, n] = h[n, c]


@njit(cache=True, parallel=True, fastmath={"contract", "arcp", "nsz"})
def _scan_bwd(x, delta, A, B, C, D, z, ckpt, dy, dh_out, has_z,
              dx_out, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dh0):  # pragma: no cover - compiled
    # inputs as in _scan_fwd; dy: (b, l, d)  dh_out: (b, d, n), the gradient reaching the final state
    # outputs: dx_out, ddelta, dz: (b, l, d)  dA_part: (b, d, n)  dB_part, dC_part: (n_blocks, b, l, n)
    #          dD_part: (b, d)  dh0: (b, d, n)   (the *_part arrays are summed over their first axis by the caller)
    batch, length, d_inner = x.shape
    n_state = A.shape[1]
    n_blocks = (d_inner + _W - 1) // _W
    n_ckpt = ckpt.shape[1]
    one = np.ones(1, dtype=x.dtype)[0]
    zero = np.zeros(1, dtype=x.dtype)[0]
    for task in prange(batch * n_blocks):
        b = task // n_blocks
        blk = task % n_blocks
        d0 = blk * _W
        At = np.zeros((n_state, _W), dtype=x.dtype)
        g = np.zeros((n_state, _W), dtype=x.dtype)  # dLoss/dh at the current step
        dA = np.zeros((n_state, _W), dtype=x.dtype)
        hs = np.zeros((_K + 1, n_state, _W), dtype=x.dtype)  # hs[i]: state after step t0 + i - 1
        decay = np.zeros((_K, n_state, _W), dtype=x.dtype)
        s = np.zeros((_K, _W), dtype=x.dtype)  # C . h + D x, before the gate
        dl = np.zeros(_W, dtype=x.dtype)
        xc = np.zeros(_W, dtype=x.dtype)
        ds = np.zeros(_W, dtype=x.dtype)
        gx = np.zeros(_W, dtype=x.dtype)
        gd = np.zeros(_W, dtype=x.dtype)
        dD = np.zeros(_W, dtype=x.dtype)
        for n in range(n_state):
            for c in range(_W):
                At[n, c] = A[d0 + c, n]
                g[n, c] = dh_out[b, d0 + c, n]
        for k in range(n_ckpt - 1, -1, -1):
            t0 = k * _K
            t1 = min(length, t0 + _K)
            # Recompute this chunk's states from its checkpoint.
            for n in range(n_state):
                for c in range(_W):
                    hs[0, n, c] = ckpt[b, k, d0 + c, n]
            for i in range(t1 - t0):
                t = t0 + i
                for c in range(_W):
                    dl[c] = delta[b, t, d0 + c]
                    xc[c] = x[b, t, d0 + c]
                    s[i, c] = D[d0 + c] * xc[c]
                for n in range(n_state):
                    Bn = B[b, t, n]
                    Cn = C[b, t, n]
                    for c in range(_W):
                        a = vexp(dl[c] * At[n, c])
                        decay[i, n, c] = a
                        hn = a * hs[i, n, c] + dl[c] * xc[c] * Bn
                        hs[i + 1, n, c] = hn
                        s[i, c] += Cn * hn
            # Adjoint pass, last step first.
            for i in range(t1 - t0 - 1, -1, -1):
                t = t0 + i
                for c in range(_W):
                    dl[c] = delta[b, t, d0 + c]
                    xc[c] = x[b, t, d0 + c]
                    dyc = dy[b, t, d0 + c]
                    if has_z:
                        zc = z[b, t, d0 + c]
                        sig = one / (one + vexp(-zc))
                        ds[c] = dyc * zc * sig
                        dz[b, t, d0 + c] = dyc * s[i, c] * sig * (one + zc * (one - sig))
                    else:
                        ds[c] = dyc
                    dD[c] += ds[c] * xc[c]
                    gx[c] = ds[c] * D[d0 + c]  # dLoss/dx
                    gd[c] = zero  # dLoss/d(delta)
                for n in range(n_state):
                    Bn = B[b, t, n]
                    Cn = C[b, t, n]
                    db = zero
                    dc = zero
                    for c in range(_W):
                        gn = g[n, c] + Cn * ds[c]
                        a = decay[i, n, c]
                        da = gn * hs[i, n, c] * a  # dLoss/d(delta * A) through the decay
                        gd[c] += da * At[n, c] + gn * xc[c] * Bn
                        dA[n, c] += da * dl[c]
                        gx[c] += gn * dl[c] * Bn
                        db += gn * dl[c] * xc[c]
                        dc += ds[c] * hs[i + 1, n, c]
                        g[n, c] = gn * a
                    dB_part[blk, b, t, n] = db
                    dC_part[blk, b, t, n] = dc
                for c in range(_W):
                    dx_out[b, t, d0 + c] = gx[c]
                    ddelta[b, t, d0 + c] = gd[c]
        for n in range(n_state):
            for c in range(_W):
                dA_part[b, d0 + c, n] = dA[n, c]
                dh0[b, d0 + c, n] = g[n, c]
        for c in range(_W):
            dD_part[b, d0 + c] = dD[c]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; arguments already in the compute dtype (float32/float64)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
        # x, dt, z: (b, l, d)  A: (d, n)  B, C: (b, l, n)  D, dt_bias: (d,)  initial_state: (b, d, n)
        batch, length, d_inner = x.shape
        pre = dt if dt_bias is None else dt + dt_bias
        delta = F.softplus(pre) if dt_softplus else pre
        Dv = D if D is not None else x.new_zeros(d_inner)
        h0 = initial_state if initial_state is not None else x.new_zeros(batch, d_inner, A.shape[1])
        zz = z if z is not None else x.new_empty(0, 0, 0)
        y = torch.empty_like(x)
        h_out = torch.empty(batch, d_inner, A.shape[1], dtype=x.dtype)
        keep = any(ctx.needs_input_grad)
        n_ckpt = -(-length // _K) if keep else 0
        ckpt = torch.empty(batch, n_ckpt, d_inner, A.shape[1], dtype=x.dtype)
        x, delta, A, B, C, Dv, zz, h0 = (t.contiguous() for t in (x, delta, A, B, C, Dv, zz, h0))
        _scan_fwd(_np(x), _np(delta), _np(A), _np(B), _np(C), _np(Dv), _np(zz), _np(h0), y.numpy(),
                  h_out.numpy(), ckpt.numpy(), z is not None)
        if keep:
            ctx.save_for_backward(x, pre, delta, A, B, C, Dv, zz, ckpt)
            ctx.flags = (D is not None, z is not None, dt_bias is not None, dt_softplus, initial_state is not None)
        return y, h_out

    @staticmethod
    def backward(ctx, dy, dh_out):
        x, pre, delta, A, B, C, Dv, zz, ckpt = ctx.saved_tensors
        has_D, has_z, has_bias, softplus, has_h0 = ctx.flags
        batch, length, d_inner = x.shape
        n_state = A.shape[1]
        n_blocks = -(-d_inner // _W)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dh_out = x.new_zeros(batch, d_inner, n_state) if dh_out is None else dh_out.contiguous()
        dx, ddelta = torch.empty_like(x), torch.empty_like(x)
        dz = torch.empty_like(x) if has_z else x.new_empty(0, 0, 0)
        dA_part = x.new_empty(batch, d_inner, n_state)
        dB_part = x.new_empty(n_blocks, batch, length, n_state)
        dC_part = x.new_empty(n_blocks, batch, length, n_state)
        dD_part = x.new_empty(batch, d_inner)
        dh0 = x.new_empty(batch, d_inner, n_state)
        _scan_bwd(_np(x), _np(delta), _np(A), _np(B), _np(C), _np(Dv), _np(zz), _np(ckpt), _np(dy), _np(dh_out),
                  has_z, dx.numpy(), ddelta.numpy(), dz.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(),
                  dD_part.numpy(), dh0.numpy())
        d_pre = ddelta * torch.sigmoid(pre) if softplus else ddelta  # softplus' = sigmoid
        d_bias = d_pre.sum((0, 1)) if has_bias else None
        return (dx, d_pre, dA_part.sum(0), dB_part.sum(0), dC_part.sum(0), dD_part.sum(0) if has_D else None,
                dz if has_z else None, d_bias, None, dh0 if has_h0 else None)


def selective_scan_numba(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # x, dt, z: (b, l, d)   A: (d, n)   B, C: (b, l, n)   D, dt_bias: (d,)   initial_state: (b, d, n)
    # -> y: (b, l, d) in x's dtype, final_state: (b, d, n) in float32 (float64 for float64 inputs)
    compute = torch.promote_types(x.dtype, torch.float32)
    d_inner = x.shape[-1]
    pad = -d_inner % _W
    cast = [None if t is None else t.to(compute) for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)]
    if pad:  # zero channels up to a multiple of _W (inert: x = A = 0); autograd slices their gradients away
        for i in (0, 1, 5, 6, 7):  # x, dt, D, z, dt_bias: channels last
            cast[i] = None if cast[i] is None else F.pad(cast[i], (0, pad))
        cast[2] = F.pad(cast[2], (0, 0, 0, pad))
        cast[8] = None if cast[8] is None else F.pad(cast[8], (0, 0, 0, pad))
    xc, dtc, Ac, Bc, Cc, Dc, zc, biasc, h0 = cast
    y, h = SelectiveScanFn.apply(xc, dtc, Ac, Bc, Cc, Dc, zc, biasc, dt_softplus, h0)
    if pad:
        y, h = y[..., :d_inner], h[:, :d_inner]
    return y.to(x.dtype), h

"""The reference kernels against independent evaluations of their recurrences."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm import ops
from hybridlm.ops import dispatch
from hybridlm.ops.conv.torch_ops import causal_conv1d_step_torch, causal_conv1d_torch
from hybridlm.ops.scan.reference import selective_scan_reference
from hybridlm.ops.ssd.chunked import ssd_chunked
from hybridlm.ops.ssd.reference import ssd_reference


def scalar_selective_scan(x, dt, A, B, C, D, z, h0):
    """The recurrence one scalar at a time, in Python floats (float64)."""
    b_, l_, d_ = x.shape
    n_ = A.shape[1]
    y = torch.zeros(b_, l_, d_, dtype=torch.float64)
    h_out = torch.zeros(b_, d_, n_, dtype=torch.float64)
    for b in range(b_):
        for d in range(d_):
            h = [float(h0[b, d, n]) for n in range(n_)]
            for t in range(l_):
                delta = float(dt[b, t, d])
                acc = 0.0
                for n in range(n_):
                    h[n] = math.exp(delta * float(A[d, n])) * h[n] + delta * float(B[b, t, n]) * float(x[b, t, d])
                    acc += float(C[b, t, n]) * h[n]
                acc += float(D[d]) * float(x[b, t, d])
                zz = float(z[b, t, d])
                y[b, t, d] = acc * zz / (1 + math.exp(-zz))
            h_out[b, d] = torch.tensor(h, dtype=torch.float64)
    return y, h_out


def scan_inputs(b=2, l=7, d=3, n=4, dtype=torch.float64):
    x = torch.randn(b, l, d, dtype=dtype)
    dt = torch.rand(b, l, d, dtype=dtype) * 0.5
    A = -torch.rand(d, n, dtype=dtype) * 2
    B, C = torch.randn(b, l, n, dtype=dtype), torch.randn(b, l, n, dtype=dtype)
    D, z = torch.randn(d, dtype=dtype), torch.randn(b, l, d, dtype=dtype)
    h0 = torch.randn(b, d, n, dtype=dtype)
    return x, dt, A, B, C, D, z, h0


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_selective_scan_reference_matches_scalar_recurrence(dtype, atol):
    x, dt, A, B, C, D, z, h0 = scan_inputs()
    expected_y, expected_h = scalar_selective_scan(x, dt, A, B, C, D, z, h0)
    cast = [t.to(dtype) for t in (x, dt, A, B, C, D, z, h0)]
    y, h = selective_scan_reference(*cast[:5], D=cast[5], z=cast[6], initial_state=cast[7])
    torch.testing.assert_close(y.double(), expected_y, atol=atol, rtol=atol)
    torch.testing.assert_close(h.double(), expected_h, atol=atol, rtol=atol)


def test_selective_scan_dt_bias_and_softplus_are_applied_before_the_recurrence():
    x, dt, A, B, C, D, z, h0 = scan_inputs()
    bias = torch.randn(x.shape[-1], dtype=torch.float64)
    y1, h1 = selective_scan_reference(x, dt, A, B, C, D, z, dt_bias=bias, dt_softplus=True, initial_state=h0)
    y2, h2 = selective_scan_reference(x, F.softplus(dt + bias), A, B, C, D, z, initial_state=h0)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1, h2)


def test_selective_scan_split_in_two_with_carried_state_equals_whole():
    x, dt, A, B, C, D, z, _ = scan_inputs(l=9)
    y, h = selective_scan_reference(x, dt, A, B, C, D, z)
    ya, ha = selective_scan_reference(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4], D, z[:, :4])
    yb, hb = selective_scan_reference(x[:, 4:], dt[:, 4:], A, B[:, 4:], C[:, 4:], D, z[:, 4:], initial_state=ha)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y)
    torch.testing.assert_close(hb, h)


def ssd_inputs(b, l, h, p, g, n, dtype=torch.float64):
    return dict(
        x=torch.randn(b, l, h, p, dtype=dtype), dt=torch.randn(b, l, h, dtype=dtype),
        A=-torch.rand(h, dtype=dtype) * 4 - 0.5, B=torch.randn(b, l, g, n, dtype=dtype),
        C=torch.randn(b, l, g, n, dtype=dtype), D=torch.randn(h, dtype=dtype),
        dt_bias=torch.randn(h, dtype=dtype), initial_state=torch.randn(b, h, p, n, dtype=dtype),
    )


def test_ssd_reference_equals_mamba1_scan_per_head():
    # With one head per channel (headdim 1) and one group per head, SSD is the Mamba-1 recurrence
    # with A constant across d_state.
    inp = ssd_inputs(b=2, l=6, h=3, p=1, g=3, n=4)
    dt = F.softplus(inp["dt"] + inp["dt_bias"])
    y, s = ssd_reference(inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], initial_state=inp["initial_state"])
    A1 = inp["A"][:, None].expand(3, 4)
    for head in range(3):
        y1, h1 = selective_scan_reference(
            inp["x"][:, :, head], dt[:, :, head:head + 1], A1[head:head + 1], inp["B"][:, :, head],
            inp["C"][:, :, head], inp["D"][head:head + 1], initial_state=inp["initial_state"][:, head])
        torch.testing.assert_close(y[:, :, head], y1)
        torch.testing.assert_close(s[:, head], h1)


@pytest.mark.parametrize(
    "b, l, h, p, g, n, chunk",
    [(1, 1, 2, 4, 1, 3, 4), (2, 13, 4, 3, 2, 5, 4), (2, 16, 4, 2, 1, 4, 4), (3, 37, 6, 4, 3, 8, 8),
     (1, 5, 2, 2, 1, 2, 64)],
)
def test_chunked_ssd_equals_sequential(b, l, h, p, g, n, chunk):
    inp = ssd_inputs(b, l, h, p, g, n)
    y_ref, s_ref = ssd_reference(**inp, dt_softplus=True)
    y, s = ssd_chunked(**inp, dt_softplus=True, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)


def test_chunked_ssd_float32_without_initial_state_or_D():
    inp = ssd_inputs(2, 29, 4, 8, 2, 16, dtype=torch.float32)
    inp.pop("initial_state")
    inp.pop("D")
    y_ref, s_ref = ssd_reference(**inp, dt_softplus=True)
    y, s = ssd_chunked(**inp, dt_softplus=True, chunk_size=8)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_chunked_ssd_gradients_equal_sequential():
    inp = ssd_inputs(2, 11, 4, 3, 2, 5)
    for t in inp.values():
        t.requires_grad_(True)
    grads = []
    for fn in (ssd_reference, ssd_chunked):
        y, s = fn(**inp, dt_softplus=True, chunk_size=4)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (s**2).sum()
        grads.append(torch.autograd.grad(loss, list(inp.values())))
    for name, g_ref, g in zip(inp, *grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9, msg=name)


def test_causal_conv_matches_padded_conv_and_carries_state():
    b, l, c, k = 2, 9, 5, 4
    x, w, bias = torch.randn(b, l, c), torch.randn(c, k), torch.randn(c)
    expected = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w[:, None], bias, groups=c).transpose(1, 2)
    y, state = causal_conv1d_torch(x, w, bias, silu=False)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(state, x[:, -k:].transpose(1, 2))
    # prefill of 5 then 4 single steps == the whole sequence
    y_a, st = causal_conv1d_torch(x[:, :5], w, bias, silu=True)
    steps = [causal_conv1d_step_torch(x[:, t], st, w, bias, silu=True) for t in range(5, l)]
    torch.testing.assert_close(torch.cat([y_a, torch.stack(steps, 1)], 1), F.silu(expected))
    # a prefill shorter than the kernel keeps zeros for the missing history
    _, short = causal_conv1d_torch(x[:, :2], w, bias)
    assert short[..., :2].abs().sum() == 0


def test_dispatch_override_by_argument_and_environment(monkeypatch):
    inp = ssd_inputs(1, 5, 2, 2, 1, 2, dtype=torch.float32)
    assert dispatch.backends("ssd")[-2:] == ["chunked", "reference"]
    assert dispatch.kernel("ssd", torch.device("cpu"), "chunked") is ssd_chunked
    assert dispatch.kernel("ssd", torch.device("cpu"), "reference") is ssd_reference
    monkeypatch.setenv(dispatch.ENV_VAR, "ssd=reference")
    assert dispatch.kernel("ssd", torch.device("cpu")) is ssd_reference
    y_env, _ = ops.ssd(**inp)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.kernel("selective_scan", torch.device("cpu")) is selective_scan_reference
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        ops.ssd(**inp)
    monkeypatch.delenv(dispatch.ENV_VAR)
    torch.testing.assert_close(ops.ssd(**inp)[0], y_env, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.kernel("nope", torch.device("cpu"))

"""Every fast kernel against its reference: forward, all gradients, odd shapes, fp32/bf16/fp64 gradcheck."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, ModelConfig, ops
from hybridlm.layers import RMSNorm
from hybridlm.ops import dispatch
from hybridlm.ops.fast_math import vexp_array
from hybridlm.ops.gemm import onednn
from hybridlm.ops.scan.numba_ops import SelectiveScanFn, selective_scan_numba
from hybridlm.ops.scan.reference import selective_scan_reference


def test_vexp_matches_exp_to_float32_rounding():
    x = torch.linspace(-87, 88, 200_001)
    got = torch.from_numpy(vexp_array(x.numpy()))
    rel = ((got.double() - x.double().exp()) / x.double().exp()).abs()
    assert rel.max() < 3e-7
    assert torch.isfinite(torch.from_numpy(vexp_array(torch.tensor([-1e4, 1e4]).numpy()))).all()


def scan_args(b, l, d, n, with_z=True, with_D=True, with_bias=True, with_h0=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + l * 10 + d + n)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(x=r(b, l, d), dt=r(b, l, d) - 1, A=-torch.rand(d, n, generator=g, dtype=torch.float64) * 3,
                B=r(b, l, n), C=r(b, l, n), D=r(d) if with_D else None, z=r(b, l, d) if with_z else None,
                dt_bias=r(d) * 0.5 if with_bias else None, initial_state=r(b, d, n) if with_h0 else None)
    return {k: None if v is None else v.to(dtype) for k, v in args.items()}


def run_with_grads(fn, args, weights):
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
    full = {**args, **leaves}
    y, h = fn(**full, dt_softplus=True)
    loss = (y.float() * weights[0]).sum() + (h.float() * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, h, dict(zip(leaves, grads, strict=True))


CASES = [  # (b, l, d, n, z, D, bias, h0): L = 1, prime L, L across checkpoint chunks, odd d, batch > 1
    (1, 1, 16, 16, True, True, True, True),
    (2, 13, 5, 1, True, False, True, False),
    (3, 67, 37, 16, False, True, False, True),
    (2, 131, 32, 64, True, True, True, True),
    (1, 64, 17, 16, False, False, False, False),
]


@pytest.mark.parametrize("b, l, d, n, with_z, with_D, with_bias, with_h0", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_scan_equals_reference_forward_and_backward(b, l, d, n, with_z, with_D, with_bias, with_h0, dtype):
    args = scan_args(b, l, d, n, with_z, with_D, with_bias, with_h0, dtype=dtype)
    weights = (torch.randn(b, l, d), torch.randn(b, d, n))
    y_ref, h_ref, g_ref = run_with_grads(selective_scan_reference, args, weights)
    y, h, g = run_with_grads(selective_scan_numba, args, weights)
    assert y.dtype == dtype and h.dtype == torch.float32
    # bf16 inputs: both accumulate in fp32 from the same bf16 values; only y's final rounding differs.
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(h, h_ref, **tol)
    assert set(g) == set(g_ref)
    for name in g_ref:
        scale = g_ref[name].float().abs().max().clamp(min=1)
        torch.testing.assert_close(g[name].float() / scale, g_ref[name].float() / scale, **tol, msg=name)


def test_numba_scan_float64_gradcheck():
    args = scan_args(2, 9, 3, 4, dtype=torch.float64)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
    inputs = tuple(args[k].requires_grad_(True) for k in names)

    def fn(x, dt, A, B, C, D, z, dt_bias, h0):
        return SelectiveScanFn.apply(x, dt, A, B, C, D, z, dt_bias, True, h0)

    # d = 3 is padded to the kernel's block inside selective_scan_numba; the Function itself needs 16 channels
    padded = [torch.nn.functional.pad(t.detach(), (0, 13)) if k in ("x", "dt", "D", "z", "dt_bias") else t.detach()
              for k, t in zip(names, inputs, strict=True)]
    padded[2] = torch.nn.functional.pad(inputs[2].detach(), (0, 0, 0, 13))
    padded[8] = torch.nn.functional.pad(inputs[8].detach(), (0, 0, 0, 13))
    assert torch.autograd.gradcheck(fn, tuple(p.requires_grad_(True) for p in padded), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda *a: selective_scan_numba(*a[:5], D=a[5], z=a[6], dt_bias=a[7],
                                                                    dt_softplus=True, initial_state=a[8]),
                                    inputs, eps=1e-6, atol=1e-7)


def test_numba_scan_split_with_carried_state_equals_whole():
    args = scan_args(2, 50, 20, 16)
    y, h = selective_scan_numba(**args, dt_softplus=True)
    cut = {k: v for k, v in args.items() if k not in ("initial_state",)}
    first = {k: (v[:, :23] if v is not None and v.dim() == 3 and v.shape[1] == 50 else v) for k, v in cut.items()}
    second = {k: (v[:, 23:] if v is not None and v.dim() == 3 and v.shape[1] == 50 else v) for k, v in cut.items()}
    ya, ha = selective_scan_numba(**first, dt_softplus=True, initial_state=args["initial_state"])
    yb, hb = selective_scan_numba(**second, dt_softplus=True, initial_state=ha)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y)
    torch.testing.assert_close(hb, h)


def test_dispatch_prefers_numba_on_cpu_and_env_forces_reference(monkeypatch):
    assert dispatch.backends("selective_scan")[-2:] == ["numba", "reference"]
    assert dispatch.kernel("selective_scan", torch.device("cpu")) is selective_scan_numba
    monkeypatch.setenv(dispatch.ENV_VAR, "selective_scan=reference")
    assert dispatch.kernel("selective_scan", torch.device("cpu")) is selective_scan_reference
    with pytest.raises(RuntimeError, match="cannot run on device meta"):
        dispatch.kernel("selective_scan", torch.device("meta"), backend="numba")


@pytest.mark.parametrize("name", ["mamba-tiny", "jamba-tiny", "mamba2-tiny", "llama-tiny"])
def test_whole_model_parity_between_backends(name, monkeypatch):
    model = HybridLM(ModelConfig.preset(name))
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    runs = []
    for backend in ("reference", None):
        if backend:
            monkeypatch.setenv(dispatch.ENV_VAR, backend)
        else:
            monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        runs.append((out.logits.detach(), grads))
        with torch.no_grad():  # prefill + decode through the state as well
            state = model.init_state(2)
            model(ids[:, :30], state=state)
            runs[-1] += (torch.cat([model(ids[:, t:t + 1], state=state).logits for t in range(30, 37)], 1),)
    (logits_ref, grads_ref, dec_ref), (logits, grads, dec) = runs
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec, dec_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for k in grads_ref:
        scale = grads_ref[k].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grads[k] / scale, grads_ref[k] / scale, atol=1e-4, rtol=1e-4, msg=k)


def test_ops_selective_scan_uses_the_dispatched_kernel():
    args = scan_args(1, 5, 16, 4)
    y1, _ = ops.selective_scan(**args, dt_softplus=True, backend="reference")
    y2, _ = ops.selective_scan(**args, dt_softplus=True)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- decode
def test_gemv_linear_equals_f_linear_and_falls_back_outside_its_domain():
    from hybridlm.ops.gemm.numba_ops import fast_gemv_applies, linear

    w, bias = torch.randn(37, 29), torch.randn(37)
    for rows in [(29,), (1, 29), (3, 1, 29)]:
        x = torch.randn(*rows)
        with torch.no_grad():
            assert fast_gemv_applies(x, w)
            torch.testing.assert_close(linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
            torch.testing.assert_close(linear(x, w), x @ w.T)
    assert not fast_gemv_applies(torch.randn(64, 29), w)  # a prefill: BLAS
    assert not fast_gemv_applies(torch.randn(1, 29, dtype=torch.float64), w.double())
    x = torch.randn(1, 29, requires_grad=True)
    assert not fast_gemv_applies(x, w)  # autograd needs the graph
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0)[None])


def test_gemv_linears_equal_f_linear_for_each_matrix():
    from hybridlm.ops.gemm.numba_ops import fast_gemv_applies, linears

    ws = (torch.randn(37, 29), torch.randn(5, 29), torch.randn(64, 29))
    bs = (torch.randn(37), None, torch.randn(64))
    assert ops.dispatch.kernel("linears", torch.device("cpu")) is linears
    for rows in [(1, 29), (2, 1, 29)]:
        x = torch.randn(*rows)
        with torch.no_grad():
            assert fast_gemv_applies(x, *ws)
            out = linears(x, ws, bs)
        assert len(out) == 3
        for y, w, b in zip(out, ws, bs, strict=True):
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    x, strided = torch.randn(1, 29), torch.randn(29, 5).t()
    assert not fast_gemv_applies(x, ws[0], strided)  # one non-contiguous matrix: F.linear for all
    with torch.no_grad():
        out = linears(x, (ws[0], strided), (None, None))
    torch.testing.assert_close(out[1], x @ strided.T)



@pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's linear is used on x86 builds of torch only")
def test_onednn_linear_equals_f_linear_and_steps_aside_for_autograd_and_other_dtypes():
    w, bias = torch.randn(37, 29), torch.randn(37)
    wide = torch.randn(64, 40)
    cases = [torch.randn(64, 29), torch.randn(2, 33, 29), wide[:, 3:32]]  # 2-d, 3-d, rows with a stride
    with torch.no_grad():
        for x in cases:
            assert onednn.onednn_applies(x, w, bias)
            torch.testing.assert_close(onednn.linear(x, w, bias), F.linear(x, w, bias))
            torch.testing.assert_close(onednn.linear(x, w), x @ w.T)
        strided_w = torch.randn(29, 37).t()  # (out, in) as a transposed view
        torch.testing.assert_close(onednn.linear(cases[0], strided_w), cases[0] @ strided_w.T)
        for dtype in (torch.float64, torch.bfloat16):
            x64 = cases[0].to(dtype)
            assert not onednn.onednn_applies(x64, w.to(dtype))
            assert torch.equal(onednn.linear(x64, w.to(dtype)), F.linear(x64, w.to(dtype)))
        assert not onednn.onednn_applies(torch.randn(0, 29), w)
    x = torch.randn(64, 29, requires_grad=True)
    assert not onednn.onednn_applies(x, w)  # no backward in oneDNN's op: F.linear records the graph
    onednn.linear(x, w, bias).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(64, 29))
    w_param = torch.nn.Parameter(w.clone())
    assert not onednn.onednn_applies(cases[0], w_param)
    with torch.no_grad():
        assert onednn.onednn_applies(cases[0], w_param)


@pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's linear is used on x86 builds of torch only")
def test_many_row_products_of_the_dispatch_go_through_onednn(monkeypatch):
    calls = []

    def spy(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(onednn, "linear", spy)
    x, w = torch.randn(9, 29), torch.randn(37, 29)
    with torch.no_grad():
        ops.linear(x, w)
        ops.linears(x, (w, w), (None, None))
        ops.gated_mlp(x, w, w, torch.randn(11, 37))
        ops.linear(x[:1], w)  # a decode row: the matrix-vector kernel
    assert calls == [(9, 29)] * 3 + [(9, 29), (9, 29), (9, 37)]

def test_gemv_gated_mlp_equals_the_swiglu_formula():
    from hybridlm.ops.gemm.numba_ops import fast_gemv_applies, gated_mlp

    assert ops.dispatch.kernel("gated_mlp", torch.device("cpu")) is gated_mlp
    w_gate, w_up, w_down = torch.randn(37, 29), torch.randn(37, 29), torch.randn(11, 37)

    def swiglu(x):
        gate = x @ w_gate.T
        return (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ w_down.T

    for rows in [(1, 29), (3, 1, 29), (9, 29)]:  # decode rows (fused kernel) and a prefill (F.linear)
        x = torch.randn(*rows) * 2
        with torch.no_grad():
            assert fast_gemv_applies(x, w_gate) == (x.numel() <= 4 * 29)
            torch.testing.assert_close(gated_mlp(x, w_gate, w_up, w_down), swiglu(x), atol=1e-4, rtol=1e-5)
    x = torch.randn(1, 29, requires_grad=True)  # autograd: the torch form, so gradients flow
    gated_mlp(x, w_gate, w_up, w_down).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    swiglu(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_rms_norm_numba_equals_the_torch_op_and_keeps_autograd():
    from hybridlm.ops.norm.numba_ops import MAX_ROWS, rms_norm_numba
    from hybridlm.ops.norm.torch_ops import rms_norm_torch

    assert ops.dispatch.kernel("rms_norm", torch.device("cpu")) is rms_norm_numba
    weight = torch.nn.Parameter(torch.randn(29))
    inputs = [torch.randn(1, 29), torch.randn(3, 1, 29) * 50, torch.randn(29, 2).t(),  # decode rows, strided
              torch.randn(MAX_ROWS + 1, 29), torch.randn(2, 29, dtype=torch.float64)]  # fall back to torch
    for x in inputs:
        with torch.no_grad():
            got = rms_norm_numba(x, weight.to(x.dtype), 1e-5)
            want = rms_norm_torch(x, weight.to(x.dtype), 1e-5)
            by_formula = weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, by_formula)
    x = torch.randn(1, 29, requires_grad=True)  # autograd: the torch form, so gradients reach x and the weight
    rms_norm_numba(x, weight, 1e-5).sum().backward()
    assert x.grad is not None and weight.grad is not None and weight.grad.abs().sum() > 0


def _torch_step(x, mixer, state, norm):
    # x: (b, d_model) -> the mixer's torch decode step, or with ``norm`` the block's x + mixer(norm(x))
    if norm is None:
        return mixer.step(x[:, None], state)[:, 0]
    return x + mixer.step(norm(x)[:, None], state)[:, 0]


def _fused_step(x, mixer, state, norm):
    # x: (b, d_model) -> the same through the mixer's bound kernel
    step = mixer.bind_step(state, norm)
    assert step is not None  # float32 CPU inference: the kernel applies
    return torch.from_numpy(step(x.contiguous().numpy()))


def _random_rms_norm(dim: int) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim) + 0.5)
    return norm


@pytest.mark.parametrize("config", [
    dict(d_model=48, n_layers=1, layers="M", ffn="none", d_state=5, d_conv=3),
    dict(d_model=32, n_layers=1, layers="M", ffn="none", mamba_inner_norms=True, proj_bias=True),
    dict(d_model=32, n_layers=1, layers="M", ffn="none", conv_bias=False, d_state=16),
])
def test_fused_mamba_step_equals_torch_step(config):
    model = HybridLM(ModelConfig(**config)).eval()
    mixer = model.layers[0].mixer
    with torch.no_grad():
        for p in mixer.parameters():  # non-trivial biases and norm weights
            p.add_(torch.randn_like(p) * 0.1)
        states = [mixer.init_state(3), mixer.init_state(3)]
        for s in states[1:]:
            s.conv.copy_(torch.randn_like(s.conv))
            s.ssm.copy_(torch.randn_like(s.ssm))
        states[0].conv.copy_(states[1].conv)
        states[0].ssm.copy_(states[1].ssm)
        block_norm = _random_rms_norm(config["d_model"])
        for i in range(4):  # alternately the mixer's step and the block's residual step x + mixer(norm(x))
            x = torch.randn(3, config["d_model"])
            norm = block_norm if i % 2 else None
            y_ref = _torch_step(x, mixer, states[0], norm)
            y = _fused_step(x, mixer, states[1], norm)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[1].ssm, states[0].ssm, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[1].conv, states[0].conv)


def test_chunked_prefill_equals_one_piece():
    model = HybridLM(ModelConfig.preset("jamba-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 45))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        for keep in (0, 1, 12):
            whole = model.init_state(2)
            expected = model(ids, state=whole, attention_mask=mask, logits_to_keep=keep).logits
            model.prefill_chunk = 8
            pieces = model.init_state(2)
            got = model(ids, state=pieces, attention_mask=mask, logits_to_keep=keep).logits
            model.prefill_chunk = HybridLM.prefill_chunk
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            token = torch.randint(0, model.config.vocab_size, (2, 1))
            torch.testing.assert_close(model(token, state=pieces).logits, model(token, state=whole).logits,
                                       atol=1e-5, rtol=1e-5)


_LONG_PREFILL = """
import resource, torch
from hybridlm import HybridLM, ModelConfig
torch.set_num_threads(2)
model = HybridLM(ModelConfig.preset("mamba-130m")).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 262144))
with torch.no_grad():
    state = model.init_state(1)
    logits = model(ids, state=state, logits_to_keep=1).logits
assert logits.shape == (1, 1, model.config.padded_vocab_size) and torch.isfinite(logits).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_256k_token_prompt_prefills_mamba_130m_under_4_gib():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LONG_PREFILL], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.strip().splitlines()[-1])
    assert peak < 4 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"


@pytest.mark.parametrize("b, l, c, k, with_bias, with_h0", [(1, 1, 16, 4, True, True), (2, 37, 32, 4, False, True),
                                                            (3, 5, 48, 3, True, False), (2, 19, 20, 4, True, True)])
def test_causal_conv_numba_and_torch_equal_f_conv1d_forward_and_backward(b, l, c, k, with_bias, with_h0):
    import torch.nn.functional as F

    from hybridlm.ops.conv.numba_ops import causal_conv1d_numba
    from hybridlm.ops.conv.torch_ops import causal_conv1d_torch

    x, w = torch.randn(b, l, c), torch.randn(c, k)
    bias = torch.randn(c) if with_bias else None
    h0 = torch.randn(b, c, k) if with_h0 else None

    def oracle(x, w, bias, h0):  # F.conv1d on the channels-first, history-padded input
        history = torch.zeros(b, c, k - 1) if h0 is None else h0[..., 1:]
        padded = torch.cat([history, x.transpose(1, 2)], -1)
        y = F.silu(F.conv1d(padded, w[:, None], bias, groups=c)).transpose(1, 2)
        return y, padded[..., -k:]

    y_ref, s_ref = oracle(x, w, bias, h0)
    with torch.no_grad():
        y, s = causal_conv1d_numba(x, w, bias, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, bias, h0)]
    grads = []
    for fn in (oracle, causal_conv1d_torch, causal_conv1d_numba):  # numba falls back to torch under autograd
        y, s = fn(*leaves)
        out = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (s**2).sum()
        grads.append(torch.autograd.grad(out, [t for t in leaves if t is not None]))
    for g_ref, g_torch, g_numba in zip(*grads, strict=True):
        torch.testing.assert_close(g_torch, g_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_numba, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    dict(d_model=64, n_layers=1, layers="S", ffn="none", mamba2_headdim=16, mamba2_ngroups=2, mamba2_d_state=8),
    dict(d_model=32, n_layers=1, layers="S", ffn="none", mamba2_headdim=8, mamba2_d_state=5, proj_bias=True,
         d_conv=3),
])
def test_fused_mamba2_step_equals_torch_step(config):
    mixer = HybridLM(ModelConfig(**config)).eval().layers[0].mixer
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        states = [mixer.init_state(2), mixer.init_state(2)]
        states[1].conv.copy_(torch.randn_like(states[1].conv))
        states[1].ssm.copy_(torch.randn_like(states[1].ssm))
        states[0].conv.copy_(states[1].conv)
        states[0].ssm.copy_(states[1].ssm)
        block_norm = _random_rms_norm(config["d_model"])
        for i in range(4):  # alternately the mixer's step and the block's residual step x + mixer(norm(x))
            x = torch.randn(2, config["d_model"])
            norm = block_norm if i % 2 else None
            y_ref = _torch_step(x, mixer, states[0], norm)
            y = _fused_step(x, mixer, states[1], norm)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[1].ssm, states[0].ssm, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[1].conv, states[0].conv)


# ------------------------------------------------------------------------------------------ Mamba-2 SSD
def ssd_case(b, l, h, p, g, n, with_D=True, with_bias=True, with_h0=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(l * 100 + n)
    return dict(
        x=torch.randn(b, l, h, p, generator=gen).to(dtype), dt=torch.randn(b, l, h, generator=gen).to(dtype),
        A=-torch.rand(h, generator=gen) * 8 - 0.5, B=torch.randn(b, l, g, n, generator=gen).to(dtype),
        C=torch.randn(b, l, g, n, generator=gen).to(dtype), D=torch.randn(h, generator=gen) if with_D else None,
        dt_bias=torch.randn(h, generator=gen) if with_bias else None,
        initial_state=torch.randn(b, h, p, n, generator=gen) if with_h0 else None,
    )


@pytest.mark.parametrize("b, l, h, p, g, n, with_D, with_bias, with_h0", [
    (1, 1, 2, 4, 1, 16, True, True, True),     # a single step
    (2, 37, 4, 8, 2, 1, True, False, True),    # prime length, two groups, d_state 1
    (1, 64, 3, 5, 1, 64, False, True, False),  # exactly one chunk, odd head size
    (2, 131, 6, 16, 3, 16, True, True, True),  # three chunks, the last of 3 steps
    (1, 200, 4, 64, 1, 128, True, True, False),  # mamba2-130m's head and state sizes
])
def test_numba_ssd_equals_reference(b, l, h, p, g, n, with_D, with_bias, with_h0):
    from hybridlm.ops.ssd.numba_ops import ssd_numba
    from hybridlm.ops.ssd.reference import ssd_reference

    inp = ssd_case(b, l, h, p, g, n, with_D, with_bias, with_h0)
    ref = {k: v.double() if v is not None else None for k, v in inp.items()}
    y_ref, s_ref = ssd_reference(**ref, dt_softplus=True)
    with torch.no_grad():
        y, s = ssd_numba(**inp, dt_softplus=True, chunk_size=256)
    assert y.dtype == torch.float32 and s.dtype == torch.float32 and y.shape == inp["x"].shape
    scale = y_ref.abs().max()
    torch.testing.assert_close(y.double() / scale, y_ref / scale, atol=2e-5, rtol=0)
    torch.testing.assert_close(s.double() / s_ref.abs().max(), s_ref / s_ref.abs().max(), atol=2e-5, rtol=0)
    if with_h0:  # the initial state is read, never written
        fresh = ssd_case(b, l, h, p, g, n, with_D, with_bias, with_h0)
        assert torch.equal(inp["initial_state"], fresh["initial_state"])


def test_numba_ssd_split_with_carried_state_equals_whole():
    from hybridlm.ops.ssd.numba_ops import ssd_numba

    inp = ssd_case(2, 150, 4, 8, 2, 16, with_h0=False)
    cut = 70
    part = lambda d, lo, hi: {k: (v[:, lo:hi] if k in ("x", "dt", "B", "C") else v) for k, v in d.items()}  # noqa: E731
    with torch.no_grad():
        y, s = ssd_numba(**inp, dt_softplus=True)
        ya, sa = ssd_numba(**part(inp, 0, cut), dt_softplus=True)
        yb, sb = ssd_numba(**{**part(inp, cut, None), "initial_state": sa}, dt_softplus=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sb, s, atol=1e-4, rtol=1e-4)


def test_numba_ssd_falls_back_to_chunked_for_autograd_and_bf16():
    from hybridlm.ops.ssd.chunked import ssd_chunked
    from hybridlm.ops.ssd.numba_ops import ssd_numba

    assert dispatch.kernel("ssd", torch.device("cpu")) is ssd_numba
    inp = ssd_case(1, 20, 2, 4, 1, 8)
    inp["x"].requires_grad_(True)
    y, _ = ssd_numba(**inp, dt_softplus=True)
    (g,) = torch.autograd.grad(y.square().sum(), inp["x"])
    y_c, _ = ssd_chunked(**inp, dt_softplus=True)
    (g_c,) = torch.autograd.grad(y_c.square().sum(), inp["x"])
    torch.testing.assert_close(g, g_c)
    half = ssd_case(1, 20, 2, 4, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        y_b, _ = ssd_numba(**half, dt_softplus=True)
    assert y_b.dtype == torch.bfloat16
    torch.testing.assert_close(y_b, ssd_chunked(**half, dt_softplus=True)[0])


# ------------------------------------------------------------------------------------ decode attention
@pytest.mark.parametrize("config", [
    dict(n_heads=4, n_kv_heads=2),                    # rotary, grouped-query
    dict(n_heads=2, attn_bias=True, rope_theta=None),  # biases, no positions (Jamba's attention)
])
def test_fused_attention_step_equals_torch_step(config, monkeypatch):
    from hybridlm.ops.step.attention import attention_step

    assert ops.step_kernel("attention_step") is attention_step
    model = HybridLM(ModelConfig(d_model=32, n_layers=1, layers="A", ffn="none", **config)).eval()
    mixer = model.layers[0].mixer
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        # A left-padded prefill: rows at different RoPE positions, padding keys in the cache; capacity 7 makes
        # the steps grow the cache.
        prompt = torch.randn(3, 5, 32)
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
        states = [mixer.init_state(3, max_len=7) for _ in range(2)]
        for s in states:
            mixer(prompt, s, mask)
        block_norm = _random_rms_norm(32)
        for i in range(4):  # alternately the mixer's step and the block's residual step x + mixer(norm(x))
            x = torch.randn(3, 32)
            norm = block_norm if i % 2 else None
            with monkeypatch.context() as m:  # the oracle: torch throughout (F.linear, SDPA, the norm)
                m.setenv(dispatch.ENV_VAR, "torch")
                y_ref = _torch_step(x, mixer, states[0], norm)
            y = _fused_step(x, mixer, states[1], norm)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
            ref, fused = states
            assert fused.length == ref.length and torch.equal(fused.n_real, ref.n_real)
            torch.testing.assert_close(fused.k[:, :, : ref.length], ref.k[:, :, : ref.length], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fused.v[:, :, : ref.length], ref.v[:, :, : ref.length], atol=1e-6, rtol=1e-5)
            assert torch.equal(fused.key_valid[:, : ref.length], ref.key_valid[:, : ref.length])
        assert fused.k.shape[2] > 7  # grown in place of the cat per token


@pytest.mark.parametrize("b, h, h_kv, d, length, capacity, padded", [
    (1, 4, 4, 16, 1, 8, False),     # the first token: one key
    (2, 8, 2, 16, 37, 50, True),    # GQA, left padding marked invalid
    (3, 6, 3, 64, 130, 130, False),  # a full cache
    (2, 12, 4, 16, 600, 640, True),   # GQA heads sharing each KV head in one task, keys over several blocks
    (1, 12, 1, 16, 300, 300, False),  # MQA: the one KV head's heads split so both threads have a task
])
def test_numba_decode_attention_equals_sdpa(b, h, h_kv, d, length, capacity, padded):
    from hybridlm.ops.attention.numba_ops import decode_attention_numba
    from hybridlm.ops.attention.torch_ops import decode_attention_torch

    assert dispatch.kernel("decode_attention", torch.device("cpu")) is decode_attention_numba
    q = torch.randn(b, h, 1, d)
    k, v = torch.randn(b, h_kv, capacity, d) * 3, torch.randn(b, h_kv, capacity, d)
    valid = None
    if padded:  # row i has i * 5 leading padding keys; the newest key is always real
        valid = torch.ones(b, capacity, dtype=torch.bool)
        for i in range(b):
            valid[i, : i * 5] = False
        k[1, :, :5] = 1e4  # a padding key with a huge score must weigh nothing
    with torch.no_grad():
        y = decode_attention_numba(q, k, v, length, valid)
    torch.testing.assert_close(y, decode_attention_torch(q, k, v, length, valid), atol=1e-5, rtol=1e-5)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]  # outside its domain: SDPA itself
    expected = decode_attention_torch(*half, length, valid)
    torch.testing.assert_close(decode_attention_numba(*half, length, valid), expected)


def test_heads_per_task_shares_each_kv_head_while_every_thread_has_a_task():
    from hybridlm.ops.attention.numba_ops import heads_per_task

    assert heads_per_task(batch=1, n_heads=12, n_kv=4, threads=2) == 3  # jamba-130m: one task per KV head
    assert heads_per_task(batch=1, n_heads=12, n_kv=12, threads=2) == 1  # no sharing to gain
    assert heads_per_task(batch=1, n_heads=12, n_kv=1, threads=2) == 6  # MQA: split in two
    assert heads_per_task(batch=1, n_heads=12, n_kv=2, threads=4) == 3  # 2 KV heads x 2 parts
    assert heads_per_task(batch=1, n_heads=12, n_kv=2, threads=8) == 1  # 12 one-head tasks: fewer leave threads idle
    assert heads_per_task(batch=4, n_heads=12, n_kv=1, threads=4) == 12


# ------------------------------------------------------------------------------------ numpy views
def test_numpy_views_follow_in_place_changes_and_are_remade_when_a_weight_is_replaced():
    from hybridlm.layers.numpy_views import numpy_views

    model = HybridLM(ModelConfig.preset("llama-tiny")).eval()
    mixer = model.layers[0].mixer
    views = numpy_views(mixer)
    assert set(views) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "rotary.inv_freq"}
    assert numpy_views(mixer) is views  # cached
    with torch.no_grad():
        mixer.q_proj.weight.mul_(2)  # in place: same storage, the views see it
    assert numpy_views(mixer) is views
    np.testing.assert_array_equal(views["q_proj.weight"], mixer.q_proj.weight.detach().numpy())
    mixer.k_proj.weight.data = torch.randn_like(mixer.k_proj.weight)  # replaced storage: remade
    fresh = numpy_views(mixer)
    assert fresh is not views
    np.testing.assert_array_equal(fresh["k_proj.weight"], mixer.k_proj.weight.detach().numpy())
    mixer.v_proj = torch.nn.Linear(*reversed(mixer.v_proj.weight.shape), bias=False)  # a replaced submodule
    np.testing.assert_array_equal(numpy_views(mixer)["v_proj.weight"], mixer.v_proj.weight.detach().numpy())
    mixer.v_proj.weight = torch.nn.Parameter(torch.randn_like(mixer.v_proj.weight))  # a replaced parameter
    np.testing.assert_array_equal(numpy_views(mixer)["v_proj.weight"], mixer.v_proj.weight.detach().numpy())
    model.double()  # outside the kernels' domain
    assert numpy_views(mixer) is None


def test_kernel_arguments_are_kept_until_the_views_are_remade():
    from hybridlm.layers.numpy_views import kernel_arguments

    mixer = HybridLM(ModelConfig.preset("mamba-tiny")).eval().layers[0].mixer
    builds = []

    def build(module, views):
        builds.append(module)
        return (views["in_proj.weight"],)

    first = kernel_arguments(mixer, build)
    assert kernel_arguments(mixer, build) is first and builds == [mixer]  # built once
    mixer.in_proj.weight.data = torch.randn_like(mixer.in_proj.weight)  # replaced storage: rebuilt from new views
    again = kernel_arguments(mixer, build)
    assert len(builds) == 2
    np.testing.assert_array_equal(again[0], mixer.in_proj.weight.detach().numpy())
    mixer.double()
    assert kernel_arguments(mixer, build) is None


@pytest.mark.parametrize("preset", ["llama-tiny", "mamba-tiny", "mamba2-tiny"])
def test_decode_after_load_state_dict_assign_uses_the_new_weights(preset):
    # The fused steps keep views of the weights; swapping in other weights must reach the next decode step.
    model = HybridLM(ModelConfig.preset(preset)).eval()
    other = HybridLM(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        state = model.init_state(1, max_len=8)
        model(ids[:, :5], state=state)
        model(ids[:, 5:], state=state)  # a fused step: views of model's own weights made
        model.load_state_dict(other.state_dict(), assign=True)
        state = model.init_state(1, max_len=8)
        model(ids[:, :5], state=state)
        fused = model(ids[:, 5:], state=state).logits
        torch.testing.assert_close(fused, other(ids).logits[:, 5:], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ gated RMSNorm
@pytest.mark.parametrize("n_groups", [1, 4])
def test_numba_gated_rms_norm_equals_the_torch_form(n_groups):
    from hybridlm.ops.norm.numba_ops import gated_rms_norm_numba
    from hybridlm.ops.norm.torch_ops import gated_rms_norm_torch

    assert dispatch.kernel("gated_rms_norm", torch.device("cpu")) is gated_rms_norm_numba
    weight = torch.rand(96) + 0.5
    proj = torch.randn(2, 37, 200)
    y, z = torch.randn(2, 37, 96), proj[..., 5:101]  # z strided, as Mamba-2 slices it from in_proj's output
    expected = gated_rms_norm_torch(y, z, weight, n_groups, 1e-5)
    torch.testing.assert_close(gated_rms_norm_numba(y, z, weight, n_groups, 1e-5), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gated_rms_norm_numba(y, z.contiguous(), weight, n_groups, 1e-5), expected,
                               atol=1e-5, rtol=1e-5)
    # outside the kernel's domain: the torch form (float64; autograd)
    torch.testing.assert_close(gated_rms_norm_numba(y.double(), z.double(), weight.double(), n_groups, 1e-5),
                               expected.double(), atol=1e-5, rtol=1e-5)
    w = weight.clone().requires_grad_()
    gated_rms_norm_numba(y, z, w, n_groups, 1e-5).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0

"""Linear attention: the chunked, quadratic and recurrent forms against a float64 loop of the recurrence, every
feature map and decay through the model, FAVOR+ against exact softmax attention, and the options' errors."""

import itertools
import math

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.layers.linear_attention import LinearAttention
from hybridlm.ops.linear_attention.chunked import linear_attention_chunked, linear_attention_quadratic
from hybridlm.ops.linear_attention.feature_maps import feature_map, orthogonal_features
from hybridlm.ops.linear_attention.reference import linear_attention_reference

DECAYS = [None, "head", "feature"]


def inputs(decay, length, b=2, h=4, h_kv=2, f=5, e=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, f, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, length, f, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, length, e, generator=g, dtype=dtype)
    shape = {None: None, "head": (b, h_kv, length), "feature": (b, h_kv, length, f)}[decay]
    log_decay = None if shape is None else -torch.rand(*shape, generator=g, dtype=dtype)
    return q, k, v, log_decay


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("length", [1, 13, 37, 64])
def test_chunked_and_quadratic_equal_the_recurrence(decay, length):
    q, k, v, log_decay = inputs(decay, length)
    initial = torch.randn(2, 2, 5, 3, dtype=torch.float64)
    expected, expected_state = linear_attention_reference(q, k, v, log_decay, initial)
    o, state = linear_attention_chunked(q, k, v, log_decay, initial, chunk_size=8)  # 13, 37: a partial chunk
    torch.testing.assert_close(o, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, expected_state, atol=1e-12, rtol=1e-12)
    if decay != "feature":
        o, state = linear_attention_quadratic(q, k, v, log_decay, query_block=8)
        expected, expected_state = linear_attention_reference(q, k, v, log_decay)
        torch.testing.assert_close(o, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(state, expected_state, atol=1e-12, rtol=1e-12)


def test_chunked_form_never_overflows_under_a_strong_gate():
    # Λ reaches -1,600 inside a chunk: a form that divides keys by exp(Λ) would overflow; this one is exact
    q, k, v, _ = inputs(None, 40)
    log_decay = torch.full((2, 2, 40, 5), -40.0, dtype=torch.float64)
    o, _ = linear_attention_chunked(q, k, v, log_decay)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, linear_attention_reference(q, k, v, log_decay)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("decay", DECAYS)
def test_chunked_form_gradients(decay):
    q, k, v, log_decay = inputs(decay, 11, b=1, h=2, h_kv=1, f=3, e=2)
    initial = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, initial) + (() if log_decay is None else (log_decay,))]

    def run(q, k, v, initial, log_decay=None):
        o, state = linear_attention_chunked(q, k, v, log_decay, initial, chunk_size=4)
        return o, state

    assert torch.autograd.gradcheck(run, leaves)


# ------------------------------------------------------------------------------------------------- the mixer
VARIANTS = [dict(feature_map=fm, decay=decay, norm=norm) for fm, decay, norm in
            itertools.product(["elu1", "performer", "taylor", "identity"], ["none", "fixed", "gla"],
                              ["normalize", "rms"]) if not (fm == "identity" and norm == "normalize")]


def linear_model(seed=0, **options) -> HybridLM:
    torch.manual_seed(seed)
    options = dict(options)
    if options.get("feature_map") == "taylor":
        options.setdefault("key_dim", 4)
    config = ModelConfig(d_model=32, n_layers=2, layers="L", n_heads=4, n_kv_heads=2, d_ff=64,
                         mixer_options={"L": dict(chunk_size=8, **options)})
    return HybridLM(config).eval()


def variant_id(options):
    return "-".join(str(v) for v in options.values())


@pytest.mark.parametrize("options", VARIANTS + [dict(feature_map="elu1", short_conv=3, output_gate=True)],
                         ids=variant_id)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(options):
    model = linear_model(**options)
    ids = torch.randint(0, 259, (2, 29))
    full = model(ids).logits
    state = model.init_state(2)
    pieces = [model(ids[:, :11], state=state).logits]  # 11: a partial chunk carried into the next call
    pieces += [model(ids[:, t:t + 1], state=state).logits for t in range(11, 29)]
    scale = full.abs().max()
    torch.testing.assert_close(torch.cat(pieces, 1) / scale, full / scale, atol=2e-6, rtol=0)


@pytest.mark.parametrize("options", [dict(feature_map="elu1", short_conv=3),
                                     dict(feature_map="identity", decay="gla", norm="rms", output_gate=True),
                                     dict(feature_map="performer", decay="fixed")], ids=variant_id)
@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone_and_later_tokens_do_not_leak(options):
    model = linear_model(**options)
    ids = torch.randint(0, 259, (1, 13))
    alone = model(ids).logits
    padded = torch.cat([torch.full((1, 5), 7), ids], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 13)], 1).bool()
    other = torch.randint(0, 259, (1, 18))
    batch = model(torch.cat([padded, other]), attention_mask=torch.cat([mask, torch.ones(1, 18).bool()])).logits
    torch.testing.assert_close(batch[:1, 5:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:], model(other).logits, atol=1e-5, rtol=1e-5)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 259
    after = model(changed).logits
    torch.testing.assert_close(after[:, :9], alone[:, :9], atol=1e-6, rtol=0)
    assert (after[:, 9:] - alone[:, 9:]).abs().max() > 1e-4


def test_state_is_fixed_size_and_survives_select_and_cat():
    model = linear_model(feature_map="elu1", short_conv=3)
    ids = torch.randint(0, 259, (3, 9))
    state = model.init_state(3)
    with torch.no_grad():
        model(ids, state=state)
        before = state.nbytes()
        model(ids[:, :1], state=state)
    assert state.nbytes() == before == {"linear_attention": state.total_nbytes()}
    mixer = model.layers[0].mixer
    assert state.layers[0].ssm.shape == (3, 2, mixer.feature_dim, mixer.head_dim + 1)
    joined = type(state).cat([state.select([2]), state.select([0, 1])])
    assert type(joined.layers[0]) is type(state.layers[0])
    torch.testing.assert_close(joined.layers[0].ssm, state.layers[0].ssm[[2, 0, 1]])


def test_gradients_reach_every_parameter():
    model = linear_model(feature_map="identity", decay="gla", norm="rms", output_gate=True, short_conv=3).train()
    ids = torch.randint(0, 259, (2, 20))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_performer_features_are_kept_by_a_checkpoint(tmp_path):
    model = linear_model(feature_map="performer", n_features=12)
    model.save_pretrained(tmp_path / "m")
    torch.manual_seed(123)  # a fresh draw would differ: the loaded model must use the saved features
    loaded = HybridLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 259, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------------- the feature maps
def test_favor_plus_estimates_softmax_and_its_error_falls_as_one_over_sqrt_m():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(64, d) * 0.5, torch.randn(64, d) * 0.5
    exact = torch.exp(q @ k.T / math.sqrt(d))  # softmax's kernel, the quantity FAVOR+ estimates without bias
    errors = {}
    for m in (16, 64, 256, 1024):
        trials = []
        for seed in range(8):
            W = orthogonal_features(m, d, torch.Generator().manual_seed(seed))
            phi_q, phi_k = feature_map(q, "performer", W, query=True), feature_map(k, "performer", W)
            assert (phi_q > 0).all() and (phi_k > 0).all()
            trials.append(((phi_q @ phi_k.T - exact).abs() / exact).mean())
        errors[m] = float(torch.stack(trials).mean())
    assert errors[16] > errors[64] > errors[256] > errors[1024]
    for small, large in ((16, 256), (64, 1024)):  # 16x the features: about 4x less error
        assert 2.5 < errors[small] / errors[large] < 6.5, errors


def test_orthogonal_features_are_orthogonal_within_a_block():
    W = orthogonal_features(20, 8, torch.Generator().manual_seed(0)).double()
    block = W[:8] / W[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


def test_taylor_features_give_the_second_order_expansion():
    q, k = torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    s = q @ k.T / math.sqrt(6)
    torch.testing.assert_close(feature_map(q, "taylor") @ feature_map(k, "taylor").T, 1 + s + s * s / 2)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("options", "message"), [
    (dict(feature_map="softmax"), r"mixer_options\['L'\].feature_map: expected one of"),
    (dict(decay="alibi"), r"mixer_options\['L'\].decay: expected one of"),
    (dict(norm="layer"), r"mixer_options\['L'\].norm: expected one of"),
    (dict(feature_map="taylor", key_dim=100), r"mixer_options\['L'\].key_dim: expected at most 64"),
    (dict(feature_map="elu1", n_features=8), r"mixer_options\['L'\].n_features: expected None unless"),
    (dict(feature_map="performer", n_features=0), r"mixer_options\['L'\].n_features: expected an integer >= 1"),
    (dict(feature_map="identity"), r"mixer_options\['L'\].norm: expected 'rms' or 'none'"),
    (dict(short_conv=-1), r"mixer_options\['L'\].short_conv: expected an integer >= 0"),
    (dict(chunk_size=0), r"mixer_options\['L'\].chunk_size: expected an integer >= 1"),
    (dict(window=4), r"mixer_options\['L'\].window: expected an option of linear attention"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(d_model=32, n_layers=1, layers="L", n_heads=2, mixer_options={"L": options})


def test_presets_build_and_report_their_state():
    for name in ("linear-tiny", "performer-tiny", "based-tiny", "retnet-tiny", "gla-tiny"):
        model = HybridLM(ModelConfig.preset(name))
        assert isinstance(model.layers[0].mixer, LinearAttention)
        assert model.init_state(1).nbytes()["linear_attention"] > 0


@pytest.mark.parametrize("options", [v | dict(short_conv=3, output_gate=v["decay"] != "none") for v in VARIANTS],
                         ids=variant_id)
@torch.no_grad()
def test_compiled_decode_step_equals_the_module_step(options, monkeypatch):
    model = linear_model(**options)
    ids = torch.randint(0, 259, (2, 12))

    def decode(backend):
        monkeypatch.setenv("HYBRIDLM_BACKEND", backend)
        state = model.init_state(2)
        logits = [model(ids[:, :5], state=state).logits[:, -1:]]
        logits += [model(ids[:, t:t + 1], state=state).logits for t in range(5, 12)]
        return torch.cat(logits, 1), state

    modules, _ = decode("fused_decode=torch")
    compiled, state = decode("")
    assert state.fused_decode is not None  # the compiled kernels ran
    torch.testing.assert_close(compiled, modules, atol=1e-5, rtol=1e-5)


def test_foreign_layouts_refuse_linear_attention_clearly(tmp_path):
    from hybridlm.interop.gguf import check_exportable

    for layers, hf, gguf in (("L", r"format 'hf': no Hugging Face layout holds a linear_attention model",
                              r"llama.cpp has no architecture for a linear_attention model"),
                             ("LA", r"JambaForCausalLM cannot hold this model", r"no linear-attention layers")):
        model = HybridLM(ModelConfig(d_model=32, n_layers=2, layers=layers, n_heads=2, rope_theta=None,
                                     mamba_inner_norms=True))
        with pytest.raises(ValueError, match=hf):
            model.save_pretrained(tmp_path / layers, format="hf")
        with pytest.raises(ValueError, match=gguf):
            check_exportable(model)
        assert not (tmp_path / layers).exists()  # nothing half-written

"""Whole-model invariants for every family: incremental == full, causality, padding, losses, MoE, state."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hybridlm import HybridLM, ModelConfig
from hybridlm.layers import MoE

FAMILIES = ["llama-tiny", "mamba-tiny", "mamba2-tiny", "jamba-tiny", "gla-tiny", "based-tiny", "reformer-tiny"]
# Each mixer on its own, with odd sizes: GQA, no RoPE, Jamba's inner norms, Mamba-2 groups and short chunks.
SINGLE_MIXERS = {
    "attention-gqa": dict(d_model=48, n_layers=1, layers="A", n_heads=6, n_kv_heads=2, ffn="none"),
    "attention-norope": dict(d_model=32, n_layers=1, layers="A", n_heads=2, rope_theta=None, ffn="none"),
    # a window of 5 over 20-23 tokens: the ring buffer wraps several times in decode
    "attention-window": dict(d_model=48, n_layers=1, layers="A", n_heads=6, n_kv_heads=2, ffn="none",
                             sliding_window=5),
    "mamba": dict(d_model=32, n_layers=1, layers="M", ffn="none", d_state=5, d_conv=3),
    "mamba-inner-norms": dict(d_model=32, n_layers=1, layers="M", ffn="none", mamba_inner_norms=True),
    "mamba2-groups": dict(d_model=32, n_layers=1, layers="S", ffn="none", mamba2_headdim=8, mamba2_ngroups=4,
                          mamba2_d_state=6, mamba2_chunk_size=5),
    "linear-attention-hybrid": dict(d_model=32, n_layers=2, layers="LA", n_heads=4, n_kv_heads=2, ffn="none",
                                    mixer_options={"L": dict(feature_map="performer", decay="fixed", chunk_size=4)}),
    # LSH attention beside full attention: 3 rounds of 4 buckets, 4 keys a round, without RoPE
    "lsh-attention-hybrid": dict(d_model=32, n_layers=2, layers="RA", n_heads=4, ffn="none", rope_theta=None,
                                 mixer_options={"R": dict(n_buckets=4, n_rounds=3, chunk_size=4)}),
}


def build(name: str) -> HybridLM:
    config = ModelConfig.preset(name) if name in FAMILIES else ModelConfig(name=name, **SINGLE_MIXERS[name])
    return HybridLM(config).eval()


def random_ids(model: HybridLM, *shape: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, shape)


@pytest.mark.parametrize("name", FAMILIES + list(SINGLE_MIXERS))
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(name):
    model = build(name)
    ids = random_ids(model, 2, 23)
    full = model(ids).logits
    state = model.init_state(2)
    pieces = [model(ids[:, :7], state=state).logits, model(ids[:, 7:12], state=state).logits]  # chunked prefill
    pieces += [model(ids[:, t:t + 1], state=state).logits for t in range(12, 23)]
    assert state.seqlen == 23
    scale = full.abs().max()
    torch.testing.assert_close(torch.cat(pieces, 1) / scale, full / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES + list(SINGLE_MIXERS))
@torch.no_grad()
def test_causality(name):
    model = build(name)
    ids = random_ids(model, 1, 20)
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % model.config.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES + ["mamba2-groups", "attention-window"])
@torch.no_grad()
def test_left_padding_does_not_change_real_positions(name):
    model = build(name)
    ids = random_ids(model, 1, 11)
    alone = model(ids).logits
    padded = torch.cat([torch.full((1, 6), 3), ids], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 11)], 1).long()
    other = random_ids(model, 1, 17)
    batch = model(torch.cat([padded, other]), attention_mask=torch.cat([mask, torch.ones(1, 17).long()])).logits
    scale = alone.abs().max()
    torch.testing.assert_close(batch[:1, 6:] / scale, alone / scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:], model(other).logits, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(batch).all()


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = build("llama-tiny")
    ids = random_ids(model, 2, 9)
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.embedding.weight.grad is not None
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_logits_to_keep_gives_the_last_positions():
    model = build("jamba-tiny")
    ids = random_ids(model, 2, 8)
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:])


def test_bad_inputs_are_specific_errors():
    model = build("llama-tiny")
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 264\), got values in"):
        model(torch.tensor([[1, 999]]))
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor of shape"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids: expected at least one token per sequence, got length 0"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 2\)"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="state: made for batch size 2"):
        model(torch.tensor([[1, 2]]), state=model.init_state(2))


# ----------------------------------------------------------------------------------------------------- MoE
def moe_config(**kw) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, layers="A", n_heads=2, moe_every=1, n_experts=4, top_k=2,
                       d_ff=48, **kw)


def test_aux_loss_is_about_one_per_moe_layer():
    model = HybridLM(moe_config())
    ids = torch.randint(0, 259, (4, 64))
    assert abs(model(ids).aux_loss.item() - 2.0) < 0.1  # 2 MoE layers, near-uniform router at init
    for module in model.modules():
        if isinstance(module, MoE):
            torch.nn.init.zeros_(module.router.weight)  # exactly uniform probabilities
    # ties broken by topk order: every token picks the same experts, f = (1/2, 1/2, 0, 0), P = 1/4
    assert model(ids).aux_loss.item() == pytest.approx(2 * 4 * (0.5 * 0.25 + 0.5 * 0.25))


@pytest.mark.parametrize("normalize", [True, False])
def test_moe_output_is_the_weighted_sum_of_the_top_k_experts(normalize):
    moe = HybridLM(moe_config(moe_normalize_topk=normalize)).layers[0].ffn
    x = torch.randn(3, 5, 32)
    probs = F.softmax(moe.router(x), -1)
    top = probs.topk(2, -1)
    weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.stack([(F.silu(x @ moe.gate_proj[e].T) * (x @ moe.up_proj[e].T)) @ moe.down_proj[e].T
                         for e in range(4)], -2)  # every expert on every token
    expected = (weights[..., None] * dense).sum(-2)
    y, _ = moe(x)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    assert ((weights > 0).sum(-1) == 2).all()  # only top-k experts contribute


def test_gradients_reach_exactly_the_experts_that_received_tokens():
    moe = HybridLM(moe_config()).layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = moe.router.weight[3, 0] = 5.0  # experts 1 and 3 win for x[..., 0] > 0
    x = torch.randn(2, 6, 32)
    x[..., 0] = x[..., 0].abs() + 1
    y, aux = moe(x)
    (y.sum() + aux).backward()
    used = moe.gate_proj.grad.flatten(1).abs().sum(1) > 0
    assert used.tolist() == [False, True, False, True]
    assert moe.router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- state
@torch.no_grad()
def test_state_bytes_kv_cache_grows_ssm_state_is_fixed():
    model = build("jamba-tiny")
    sizes = []
    for n in (16, 160):
        state = model.init_state(1)
        model(random_ids(model, 1, n), state=state)
        sizes.append(state.nbytes())
    assert sizes[0]["mamba"] == sizes[1]["mamba"] and sizes[0]["mamba2"] == sizes[1]["mamba2"]
    assert sizes[1]["attention"] >= 10 * sizes[0]["attention"]
    # the KV cache counts exactly its keys and values: 2 * heads_kv * head_dim * 4 bytes per token
    c = model.config
    exact = model.init_state(1, max_len=100).nbytes()["attention"]
    assert exact == c.layers.count("A") * 2 * c.n_kv_heads * c.head_dim * 4 * 100


@torch.no_grad()
def test_kv_cache_grows_in_place_with_amortised_doubling():
    model = build("llama-tiny")
    state = model.init_state(1, max_len=4)
    cache = state.layers[0]
    capacities = []
    ids = random_ids(model, 1, 40)
    model(ids[:, :4], state=state)
    for t in range(4, 40):
        model(ids[:, t:t + 1], state=state)
        capacities.append(cache.k.shape[2])
    assert cache.length == 40
    assert len(set(capacities)) <= 5  # 8, 16, 32, 64: a handful of reallocations, not one per token


class ElementCounter(TorchDispatchMode):
    """Counts the elements every aten op writes: a proxy for work that sees sequence-shaped tensors."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def decode_work(model: HybridLM, context: int) -> int:
    state = model.init_state(1, max_len=context + 2)
    model(random_ids(model, 1, context), state=state)
    token = random_ids(model, 1, 1)
    model(token, state=state)  # the first step also makes the kernels' views of the weights, once per model
    with ElementCounter() as counter:
        model(token, state=state)
    return counter.elements


@torch.no_grad()
def test_ssm_decode_cost_is_independent_of_context_attention_grows():
    for name in ("mamba-tiny", "mamba2-tiny"):
        model = build(name)
        assert decode_work(model, 8) == decode_work(model, 300)
    model = build("llama-tiny")
    assert decode_work(model, 300) > decode_work(model, 8)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path):
    model = build("jamba-tiny")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HybridLM.from_pretrained(tmp_path / "ckpt")
    ids = random_ids(model, 1, 10)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.embedding.weight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    model.save_pretrained(tmp_path / "ckpt")  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_parameter_counts_match_published(tmp_path):
    with torch.device("meta"):
        assert HybridLM(ModelConfig.preset("mamba-130m")).num_parameters() == 129_135_360
        assert HybridLM(ModelConfig.preset("mamba2-130m")).num_parameters() == 128_989_632


def test_published_initialisations():
    model = HybridLM(ModelConfig.preset("jamba-tiny"))
    mamba, mamba2 = model.layers[0].mixer, model.layers[2].mixer
    n = model.config.d_state
    torch.testing.assert_close(-torch.exp(mamba.A_log), -torch.arange(1.0, n + 1).repeat(mamba.d_inner, 1))
    assert (mamba.D == 1).all() and (mamba2.D == 1).all()
    for bias in (mamba.dt_proj.bias, mamba2.dt_bias):
        dt = F.softplus(bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    A2 = torch.exp(mamba2.A_log)
    assert A2.min() >= 1 and A2.max() <= 16

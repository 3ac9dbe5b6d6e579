import dataclasses

import pytest
import torch

from hybridlm import HybridLM, ModelConfig
from hybridlm.decode import FusedDecode
from hybridlm.ops import dispatch

PRESETS = ["mamba-tiny", "mamba2-tiny", "llama-tiny", "jamba-tiny"]


def _decode(model, ids, steps, monkeypatch, backend=None):
    # a prefill of ids, then ``steps`` greedy tokens: every step's logits and aux loss, and the final state
    with monkeypatch.context() as m, torch.no_grad():
        if backend:
            m.setenv(dispatch.ENV_VAR, backend)
        state = model.init_state(ids.shape[0], max_len=ids.shape[1] + 2)  # small: the KV caches must grow
        out = model(ids, state=state)
        token = out.logits[:, -1:].argmax(-1)
        seen = []
        for _ in range(steps):
            out = model(token, state=state, logits_to_keep=1)
            seen.append((out.logits, out.aux_loss))
            token = out.logits[:, -1:].argmax(-1)
    return seen, state


@pytest.mark.parametrize("preset", PRESETS)
def test_bound_decode_equals_the_blocks_run_one_by_one(preset, monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    fused, state = _decode(model, ids, 5, monkeypatch)
    assert isinstance(state.fused_decode, FusedDecode)  # the bound path ran
    assert any(step is not None for step in state.fused_decode.steps) and state.fused_decode.head is not None
    # a model of SSM blocks alone runs its whole step as one call; feed-forwards are bound too
    assert (state.fused_decode.stack is not None) == (preset in ("mamba-tiny", "mamba2-tiny"))
    assert all((ffn_step is not None) == (block.ffn is not None)
               for block, ffn_step in zip(model.layers, state.fused_decode.ffn_steps, strict=True))
    blocks, state = _decode(model, ids, 5, monkeypatch, backend="fused_decode=torch")
    assert state.fused_decode is None
    for (logits, aux), (logits_ref, aux_ref) in zip(fused, blocks, strict=True):
        torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(aux, aux_ref)


def test_bound_decode_is_kept_and_rebound_when_a_weight_or_state_is_replaced():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    token = ids[:, -1:]
    with torch.no_grad():
        state = model.init_state(1)
        model(ids, state=state)
        model(token, state=state)
        bound = state.fused_decode
        model(token, state=state)
        assert state.fused_decode is bound  # kept across tokens

        # A weight replaced mid-generation: the next step must use it (same state, copied for the oracle).
        mixer = model.layers[0].mixer
        mixer.out_proj.weight.data = torch.randn_like(mixer.out_proj.weight) * 0.1
        twin = state.select([0])
        got = model(token, state=state).logits
        assert state.fused_decode is not bound
        with pytest.MonkeyPatch.context() as m:
            m.setenv(dispatch.ENV_VAR, "fused_decode=torch")
            expected = model(token, state=twin).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

        # A layer's state replaced (as a scheduler might): rebound to the new tensors.
        bound = state.fused_decode
        state.layers[1] = state.layers[1].select(torch.tensor([0]))
        model(token, state=state)
        assert state.fused_decode is not bound


def test_a_forced_step_backend_is_not_bypassed(monkeypatch):
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    monkeypatch.setenv(dispatch.ENV_VAR, "mamba_step=torch")
    with torch.no_grad():
        state = model.init_state(1)
        model(ids, state=state)
        model(ids[:, -1:], state=state)
    assert state.fused_decode is None or all(step is None for step in state.fused_decode.steps)


def test_forward_hooks_still_see_every_decode_step(monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("jamba-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    expected, _ = _decode(model, ids, 3, monkeypatch)
    seen = []
    handles = [model.layers[0].mixer.register_forward_hook(lambda m, args, out: seen.append("mixer0")),
               model.layers[1].register_forward_pre_hook(lambda m, args: seen.append("block1")),
               model.layers[2].norm.register_forward_hook(lambda m, args, out: seen.append("norm2")),
               model.layers[3].ffn.register_forward_hook(lambda m, args, out: seen.append("ffn3")),
               model.norm_f.register_forward_hook(lambda m, args, out: seen.append("norm_f"))]
    got, state = _decode(model, ids, 3, monkeypatch)
    assert all(seen.count(name) == 4 for name in ("mixer0", "block1", "norm2", "ffn3", "norm_f"))  # 1 + 3
    for (logits, _), (logits_ref, _) in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-5)
    for h in handles:
        h.remove()
    with torch.no_grad():  # no hooks left: the next step binds those blocks again
        model(ids[:, -1:], state=state)
    assert all(step is not None for step in state.fused_decode.steps[:3]) and state.fused_decode.head is not None
    assert state.fused_decode.ffn_steps[3] is not None


@pytest.mark.parametrize("preset", ["mamba-tiny", "mamba2-tiny"])
def test_the_whole_model_call_equals_the_bound_blocks(preset, monkeypatch):
    # The one-call step against the same kernels called block by block (the stack dropped after binding)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        states = [model.init_state(2), model.init_state(2)]
        for state in states:
            model(ids, state=state)
            model(ids[:, -1:], state=state)
        assert states[0].fused_decode.stack is not None
        states[1].fused_decode.stack = None
        token = ids[:, -1:]
        for _ in range(4):
            whole, blocks = (model(token.int(), state=states[0]).logits,  # int32 ids are taken too
                             model(token, state=states[1]).logits)
            torch.testing.assert_close(whole, blocks, atol=0, rtol=0)
            token = whole[:, -1:].argmax(-1)
    for held, ref in zip(states[0].layers, states[1].layers, strict=True):
        torch.testing.assert_close(held.ssm, ref.ssm, atol=0, rtol=0)
        torch.testing.assert_close(held.conv, ref.conv, atol=0, rtol=0)


def test_a_hooked_embedding_takes_the_block_path(monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("mamba-tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    expected, _ = _decode(model, ids, 2, monkeypatch)
    seen = []
    handle = model.embedding.register_forward_hook(lambda m, args, out: seen.append(1))
    got, state = _decode(model, ids, 2, monkeypatch)
    assert len(seen) == 3 and state.fused_decode.stack is None  # the prefill and both steps
    for (logits, _), (logits_ref, _) in zip(got, expected, strict=True):
        torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-5)
    handle.remove()
    with torch.no_grad():
        model(ids[:, -1:], state=state)
    assert state.fused_decode.stack is not None


@pytest.mark.parametrize("kind,normalize", [("mlp", False), ("moe", False), ("moe", True)])
def test_a_feed_forward_step_equals_its_modules(kind, normalize):
    # hidden + ffn(norm(hidden)) and MoE's load-balancing loss, over tokens routed to different experts
    from hybridlm.layers import FEED_FORWARDS, RMSNorm

    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.preset("jamba-tiny"), moe_normalize_topk=normalize)
    ffn, norm = FEED_FORWARDS[kind](config), RMSNorm(config.d_model, config.norm_eps)
    for p in (*ffn.parameters(), norm.weight):
        torch.nn.init.normal_(p, std=0.5)
    hidden = torch.randn(5, config.d_model)
    with torch.no_grad():
        y, aux = ffn(norm(hidden)[:, None])
        out, loss = ffn.bind_step(norm)(hidden.numpy())
    torch.testing.assert_close(torch.from_numpy(out), hidden + y[:, 0], atol=1e-5, rtol=1e-5)
    assert loss == (0.0 if aux is None else pytest.approx(aux.item(), rel=1e-6))

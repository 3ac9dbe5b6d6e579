"""Sliding-window attention (Mistral): banded prefill, the KV cache as a ring buffer of the window, its fused decode
step, continuous batching of ring buffers, and parity with transformers' Mistral and Mixtral beyond the window."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import HybridLM, InferenceState, ModelConfig
from hybridlm.layers.attention import Attention, KVCache
from hybridlm.ops import dispatch
from hybridlm.ops.attention.reference import sliding_window_attention_reference
from hybridlm.ops.attention.torch_ops import sliding_window_attention

WINDOW = 4
# GQA (6 query heads on 2 KV heads), an MLP, two layers: small, and every piece of a block on the path
CONFIG = ModelConfig(d_model=48, n_layers=2, layers="A", n_heads=6, n_kv_heads=2, d_ff=64, sliding_window=WINDOW)


def windowed(window: int | None = WINDOW, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(dataclasses.replace(CONFIG, sliding_window=window)).eval()


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, shape)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_a_bad_window_is_a_clear_error_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"ModelConfig.sliding_window: expected a positive integer .* or None, got"):
        dataclasses.replace(CONFIG, sliding_window=bad)
    with pytest.raises(ValueError, match="ModelConfig.sliding_window"):
        ModelConfig.from_dict({**CONFIG.to_dict(), "sliding_window": bad})


def test_the_window_is_part_of_the_config_and_its_round_trip():
    assert ModelConfig.from_json(CONFIG.to_json()) == CONFIG
    assert ModelConfig().sliding_window is None  # full attention unless asked
    assert "sliding_window" in Attention.semantic_fields  # a stored config with another window is another model


# ------------------------------------------------------------------------------------- the banded attention
@pytest.mark.parametrize("window", [1, 3, 8, 36, 37, 64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("queries", [37, 1, 10])  # all positions; the last ones (a prefill after a cache)
def test_banded_attention_equals_the_reference_loop(window, padded, queries):
    torch.manual_seed(window)
    q, k, v = torch.randn(2, 6, queries, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    valid = None
    if padded:
        valid = torch.ones(2, 37, dtype=torch.bool)
        valid[0, :9] = False  # left padding, longer than some windows: padding queries see only themselves
    want = sliding_window_attention_reference(q, k, v, window, valid)
    for block in (5, 128):  # blocks not dividing the length, and one block for all
        torch.testing.assert_close(sliding_window_attention(q, k, v, window, valid, block=block), want,
                                   atol=1e-5, rtol=1e-5)


def test_banded_attention_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.ones(1, 11, dtype=torch.bool)
    valid[0, :2] = False
    assert torch.autograd.gradcheck(lambda q, k, v: sliding_window_attention(q, k, v, 3, valid, block=4), (q, k, v))


def test_banded_attention_builds_no_mask_of_the_whole_sequence(monkeypatch):
    import hybridlm.ops.attention.torch_ops as torch_ops

    widest = []
    real_sdpa = torch_ops.sdpa

    def spy(q, k, v, attn_mask=None, is_causal=False):
        widest.append(k.shape[2] if attn_mask is None else attn_mask.shape[-1] * attn_mask.shape[-2])
        return real_sdpa(q, k, v, attn_mask, is_causal)

    monkeypatch.setattr(torch_ops, "sdpa", spy)
    q = k = v = torch.randn(1, 2, 1000, 4)
    sliding_window_attention(q, k, v, 16, block=32)
    assert max(widest) <= 32 * (32 + 16 - 1)  # one block's band, never 1000 x 1000


def test_the_layer_equals_projections_then_reference_banded_attention():
    torch.manual_seed(1)
    mixer = Attention(CONFIG).eval()
    x = torch.randn(2, 13, CONFIG.d_model)
    with torch.no_grad():
        b, n, hd = 2, 13, CONFIG.head_dim
        q = mixer.q_proj(x).view(b, n, -1, hd).transpose(1, 2)
        k = mixer.k_proj(x).view(b, n, -1, hd).transpose(1, 2)
        v = mixer.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
        q, k = mixer.rotary(q, k, torch.arange(n).expand(b, n))
        y = sliding_window_attention_reference(q, k, v, WINDOW)
        want = mixer.o_proj(y.transpose(1, 2).reshape(b, n, -1))
        close(mixer(x), want)


@torch.no_grad()
def test_equal_to_full_attention_while_the_window_covers_the_sequence():
    full, ids_ = windowed(None), ids(2, 9)
    want = full(ids_).logits
    for window in (9, 10, 1000):
        model = windowed(window)
        assert torch.equal(model(ids_).logits, want)  # the same SDPA call: bit for bit
        state = model.init_state(2)
        pieces = [model(ids_[:, :5], state=state).logits] + [model(ids_[:, t:t + 1], state=state).logits
                                                               for t in range(5, 9)]
        close(torch.cat(pieces, 1), want)
    assert not torch.allclose(windowed(8)(ids_).logits[:, 8:], want[:, 8:])  # position 8 loses key 0


def test_training_through_the_window_has_gradients():
    model = windowed().train()
    out = model(ids(2, 19), labels=ids(2, 19))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------- the ring-buffer cache
@pytest.mark.parametrize("backend", [None, "fused_decode=torch"])  # the bound kernels, the modules' torch steps
@torch.no_grad()
def test_prefill_then_decode_past_the_window_equals_the_full_forward(backend, monkeypatch):
    if backend:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
    model, ids_ = windowed(), ids(2, 41)
    want = model(ids_).logits
    state = model.init_state(2, max_len=2)  # grows, then stops at the window
    # a prompt longer than the window in pieces shorter and longer than it, then 30 tokens: the ring wraps 7 times
    pieces = [model(ids_[:, :3], state=state).logits, model(ids_[:, 3:11], state=state).logits]
    pieces += [model(ids_[:, t:t + 1], state=state).logits for t in range(11, 41)]
    close(torch.cat(pieces, 1), want)
    cache: KVCache = state.layers[0]
    assert cache.length == 41 and cache.held == WINDOW and cache.k.shape[2] == WINDOW
    assert (state.fused_decode is None) == (backend is not None)


@torch.no_grad()
def test_state_bytes_stop_growing_at_the_window():
    model, ids_ = windowed(), ids(1, 30)
    state = model.init_state(1)
    seen = []
    for t in range(30):
        model(ids_[:, t:t + 1], state=state)
        seen.append(state.nbytes()["attention"])
    per_position = seen[0]
    assert seen[WINDOW - 1] == WINDOW * per_position and set(seen[WINDOW - 1:]) == {WINDOW * per_position}
    cache = state.layers[0]
    assert cache.nbytes_at(10**6) == cache.nbytes_at(WINDOW) == cache.nbytes() and cache.nbytes_at(2) * 2 == \
        cache.nbytes_at(WINDOW)
    assert cache.description == f"KV cache (ring buffer of {WINDOW} positions)"
    big = windowed().init_state(1, max_len=65536)  # preallocating a long context still holds only the window
    assert big.layers[0].k.shape[2] == WINDOW


@pytest.mark.parametrize("backend", [None, "fused_decode=torch"])
@torch.no_grad()
def test_a_left_padded_batch_decodes_as_each_prompt_alone(backend, monkeypatch):
    # Prompts of 2, 9 and 6 tokens in one left-padded batch (padding longer than the window), then 12 steps
    if backend:
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
    model = windowed()
    prompts = [ids(1, n) for n in (2, 9, 6)]
    steps = ids(3, 12)
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1]), torch.ones(1, p.shape[1])], 1)
                      for p in prompts]).long()
    state = model.init_state(3)
    got = [model(batch, state=state, attention_mask=mask).logits[:, -1:]]
    got += [model(steps[:, t:t + 1], state=state).logits for t in range(12)]
    got = torch.cat(got, 1)
    assert torch.isfinite(got).all()
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, steps[row:row + 1]], 1)).logits[:, prompt.shape[1] - 1:]
        close(got[row:row + 1], alone)


@torch.no_grad()
def test_batched_equals_one_by_one():
    model, ids_ = windowed(), ids(3, 17)
    batch = model(ids_).logits
    for row in range(3):
        close(batch[row:row + 1], model(ids_[row:row + 1]).logits)


@torch.no_grad()
def test_the_fused_kernel_equals_the_torch_step_through_a_wrapping_padded_ring(monkeypatch):
    torch.manual_seed(3)
    mixer = Attention(CONFIG).eval()
    for p in mixer.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randn(3, 7, CONFIG.d_model)
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [1] * 7, [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    states = [mixer.init_state(3, max_len=1) for _ in range(2)]
    for s in states:
        mixer(prompt, s, mask)
    ref, fused = states
    step = mixer.bind_step(fused)
    assert step is not None  # float32 CPU inference: the kernel applies
    for _ in range(3 * WINDOW + 1):  # the ring wraps three times, overwriting the padding's slots
        x = torch.randn(3, CONFIG.d_model)
        with monkeypatch.context() as m:
            m.setenv(dispatch.ENV_VAR, "torch")
            want = mixer.step(x[:, None], ref)[:, 0]
        got = torch.from_numpy(step(x.numpy()))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert fused.length == ref.length and torch.equal(fused.n_real, ref.n_real)
        torch.testing.assert_close(fused.k, ref.k, atol=1e-6, rtol=1e-5)
        assert torch.equal(fused.key_valid, ref.key_valid)
    assert ref.key_valid.all()  # every padding key has left the window


@torch.no_grad()
def test_select_and_cat_of_ring_buffers_decode_as_alone():
    # continuous batching: sequences at different points of their rings join and leave a running batch
    model = windowed()
    prompts, steps = [ids(1, n) for n in (2, 13, 6, 1)], [9, 5, 11, 7]
    alone = []
    for prompt, n in zip(prompts, steps, strict=True):
        follow = ids(1, n)
        alone.append((follow, model(torch.cat([prompt, follow], 1)).logits[0, prompt.shape[1] - 1:-1]))
    batch, rows, seen = None, [], [[] for _ in prompts]
    for t in range(20):
        if t % 3 == 0 and t // 3 < len(prompts):  # join, prefilled alone
            i = t // 3
            state = model.init_state(1)
            seen[i].append(model(prompts[i], state=state).logits[0, -1])
            batch = state if batch is None else InferenceState.cat([batch, state], capacity=64)
            rows.append(i)
        keep = [j for j, i in enumerate(rows) if len(seen[i]) < steps[i]]
        if len(keep) < len(rows):  # leave
            batch, rows = batch.select(keep), [rows[j] for j in keep]
        if not rows:
            continue
        tokens = torch.tensor([[int(alone[i][0][0, len(seen[i]) - 1])] for i in rows])
        out = model(tokens, state=batch).logits[:, -1]
        for j, i in enumerate(rows):
            seen[i].append(out[j])
        assert all(c.k.shape[2] <= WINDOW for c in batch.layers)  # capacity 64 asked, the window kept
    for i, (_, want) in enumerate(alone):
        close(torch.stack(seen[i]), want)


def test_cat_lays_a_wrapped_ring_out_in_order():
    cache = KVCache(torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3, 1), torch.zeros(1, dtype=torch.long), window=3)
    for p in range(7):  # positions 0..6: slots hold 6, 4, 5
        cache.append(torch.full((1, 1, 1, 1), float(p)), torch.full((1, 1, 1, 1), float(p)))
    assert cache.k.flatten().tolist() == [6, 4, 5]
    short = KVCache(torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3, 1), torch.zeros(1, dtype=torch.long), window=3)
    short.append(torch.full((1, 1, 1, 1), 9.0), torch.full((1, 1, 1, 1), 9.0))
    both = KVCache.cat([cache, short], capacity=100)
    assert both.k.shape[2] == 3 and both.length == 3 and both.window == 3
    assert both.k[:, 0, :, 0].tolist() == [[4, 5, 6], [0, 0, 9]]
    assert both.key_valid.tolist() == [[True] * 3, [False, False, True]]
    assert both.n_real.tolist() == [7, 1]
    alone = both.select(torch.tensor([1]))  # the padding every kept row shares goes
    assert alone.length == 1 and alone.k[0, 0, :1, 0].tolist() == [9]


@settings(max_examples=60, deadline=None)
@given(window=st.integers(1, 6), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
       capacity=st.integers(0, 8), data=st.data())
def test_a_ring_holds_the_last_window_of_what_a_full_cache_holds(window, chunks, capacity, data):
    # appends of any sizes (padding among them), with any preallocation: the ring's positions, oldest first, are the
    # full cache's last ``window``, with the same validity and RoPE counters
    def empty(w: int | None) -> KVCache:
        slots = capacity if w is None else min(capacity, w)
        return KVCache(torch.zeros(2, 1, slots, 1), torch.zeros(2, 1, slots, 1), torch.zeros(2, dtype=torch.long),
                       window=w)

    ring, full, start = empty(window), empty(None), 0
    for n in chunks:
        k = torch.arange(start, start + n, dtype=torch.float32).expand(2, 1, n)[..., None]
        valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=2,
                                                max_size=2))) if data.draw(st.booleans()) else None
        for cache in (ring, full):
            cache.append(k, -k, valid)
        start += n
    got, want = ring.ordered(), full.ordered()
    assert ring.k.shape[2] <= window and ring.held == min(start, window) and ring.length == full.length == start
    assert torch.equal(got[0], want[0][:, :, -window:]) and torch.equal(got[1], want[1][:, :, -window:])
    assert (got[2] is None) == (want[2] is None) and (got[2] is None or torch.equal(got[2], want[2][:, -window:]))
    assert torch.equal(ring.n_real, full.n_real)


# ----------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _hf(kind: str, window: int | None):
    from interop_models import perturb

    attn = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=104, sliding_window=window)
    torch.manual_seed(2)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**attn))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**attn, num_local_experts=4,
                                                                           num_experts_per_tok=2))
    return perturb(model).eval()


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
@torch.no_grad()
def test_matches_transformers_beyond_the_window_in_prefill_and_decode(kind, tmp_path):
    hf = _hf(kind, 5)
    hf.save_pretrained(tmp_path)
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.sliding_window == 5
    ids_ = torch.randint(0, 104, (2, 23))
    want = hf(ids_).logits
    full_attention = _hf(kind, None)(ids_).logits  # the same weights (same seed) without the window
    assert not torch.allclose(want[:, 5:], full_attention[:, 5:], atol=1e-3)  # transformers applies it
    torch.testing.assert_close(ours(ids_).logits, want, atol=1e-4, rtol=0)
    state = ours.init_state(2)
    pieces = [ours(ids_[:, :8], state=state).logits]
    pieces += [ours(ids_[:, t:t + 1], state=state).logits for t in range(8, 23)]
    torch.testing.assert_close(torch.cat(pieces, 1), want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_generation_past_the_window_matches_transformers(tmp_path):
    hf = _hf("mistral", 4)
    hf.save_pretrained(tmp_path)
    ours = HybridLM.from_pretrained(tmp_path).eval()
    ids_ = torch.randint(0, 104, (2, 7))
    hf.generation_config.eos_token_id = None
    want = hf.generate(ids_, max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids_))
    assert torch.equal(ours.generate(ids_, 20, temperature=0), want)


@pytest.mark.parametrize("moe", [False, True])
@torch.no_grad()
def test_a_windowed_model_exports_as_mistral_or_mixtral_and_back(moe, tmp_path):
    config = dataclasses.replace(CONFIG, moe_every=int(moe), n_experts=4, tie_embeddings=False)
    torch.manual_seed(4)
    model = HybridLM(config).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf", format="hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("MixtralForCausalLM" if moe else "MistralForCausalLM")
    assert theirs.config.sliding_window == WINDOW
    ids_ = ids(2, 15)
    torch.testing.assert_close(theirs(ids_).logits, model(ids_).logits, atol=1e-4, rtol=0)
    back = HybridLM.from_pretrained(tmp_path / "hf")
    assert back.config == model.config


def test_config_translation_reads_the_window_as_transformers_does():
    from hybridlm.interop import hf_jamba, hf_llama

    small = {"hidden_size": 64, "num_attention_heads": 4}
    assert hf_llama.to_config({"model_type": "mistral", "sliding_window": 7, **small}).sliding_window == 7
    assert hf_llama.to_config({"model_type": "mistral", **small}).sliding_window == 4096  # MistralConfig's default
    assert hf_llama.to_config({"model_type": "mixtral", **small}).sliding_window is None
    assert hf_llama.to_config({"model_type": "llama", "sliding_window": 7, **small}).sliding_window is None
    with pytest.raises(ValueError, match="MistralForCausalLM .* has no attention biases"):
        hf_llama.from_config(dataclasses.replace(CONFIG, attn_bias=True))
    jamba = ModelConfig(d_model=64, n_layers=4, layers="MMAM", ffn="mlp", n_heads=4, mamba_inner_norms=True,
                        rope_theta=None, sliding_window=8)
    with pytest.raises(ValueError, match="needs sliding_window=None"):
        hf_jamba.from_config(jamba)


def test_gguf_export_warns_that_llama_cpp_attends_to_the_whole_context(tmp_path):
    pytest.importorskip("gguf")
    from hybridlm.interop.gguf import export_gguf

    with pytest.warns(UserWarning, match="sliding_window=4 is not written; llama.cpp's llama architecture"):
        export_gguf(windowed(), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").is_file()

"""LSH attention (Reformer): the sorted-chunk form and the decode step against a per-query float64 loop, exactness
with one bucket, error falling with hash rounds, causality, padding, gradients and the options' errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, ModelConfig
from hybridlm.ops.lsh_attention.decode import lsh_decode_attention
from hybridlm.ops.lsh_attention.hashing import hash_buckets, random_rotations
from hybridlm.ops.lsh_attention.reference import lsh_attention_reference
from hybridlm.ops.lsh_attention.sorted_chunks import SELF_SCORE, lsh_attention_sorted


def inputs(length, b=2, h=2, d=8, e=5, n_buckets=4, n_rounds=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h, length, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, length, e, generator=g, dtype=dtype)
    rotations = random_rotations(h, n_rounds, d, n_buckets, seed=seed + 1).to(dtype)
    return qk, v, hash_buckets(qk, rotations, n_buckets)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("length,chunk,n_buckets", [(1, 4, 4), (13, 4, 4), (17, 5, 8), (31, 3, 2), (9, 16, 1)])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_sorted_chunks_equal_the_per_query_loop(length, chunk, n_buckets, exclude_self):
    qk, v, buckets = inputs(length, n_buckets=n_buckets)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, : length // 3] = False  # left padding in the first row
    for key_valid in (None, valid):
        out = lsh_attention_sorted(qk, v, buckets, chunk, key_valid, exclude_self)
        expected = lsh_attention_reference(qk, v, buckets, chunk, key_valid, exclude_self)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_one_bucket_and_a_chunk_past_the_length_is_exact_causal_attention():
    qk, v, _ = inputs(29, n_buckets=1)
    buckets = torch.zeros(2, 2, 3, 29, dtype=torch.long)
    exact = F.scaled_dot_product_attention(qk, F.normalize(qk, dim=-1), v, is_causal=True)
    torch.testing.assert_close(lsh_attention_sorted(qk, v, buckets, 32, exclude_self=False), exact, atol=1e-12,
                               rtol=0)
    # shared QK as Reformer: a token's own score is SELF_SCORE, so it counts only when nothing else is in reach
    scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.eye(29, dtype=torch.bool), SELF_SCORE)
    scores = scores.masked_fill(torch.ones(29, 29, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lsh_attention_sorted(qk, v, buckets, 32), torch.softmax(scores, -1) @ v, atol=1e-12,
                               rtol=0)


def test_the_error_against_exact_attention_falls_as_rounds_grow():
    # Clustered vectors, as trained queries are: attention is peaked, and more rounds find more of its mass.
    g = torch.Generator().manual_seed(0)
    length, d = 512, 16
    centres = torch.randn(16, d, generator=g, dtype=torch.float64) * 2
    members = centres[torch.randint(0, 16, (length,), generator=g)]
    qk = 4 * (members + 0.5 * torch.randn(length, d, generator=g, dtype=torch.float64))[None, None]
    v = torch.randn(1, 1, length, d, generator=g, dtype=torch.float64)
    exact = lsh_attention_sorted(qk, v, torch.zeros(1, 1, 1, length, dtype=torch.long), length)
    errors = []
    for n_rounds in (1, 2, 4, 8):
        buckets = hash_buckets(qk, random_rotations(1, n_rounds, d, 16, seed=3).double(), 16)
        errors.append(relative_error(lsh_attention_sorted(qk, v, buckets, 32), exact))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0], errors  # 1.07, 0.71, 0.49, 0.37 when written


def test_a_later_token_never_changes_an_earlier_output():
    # The published chunking would fail this: a token appended in a low bucket shifts every later bucket's chunk
    # boundaries. Keeping each query to its bucket's most recent keys depends on earlier tokens only.
    qk, v, buckets = inputs(40, n_buckets=4)
    out = lsh_attention_sorted(qk, v, buckets, 4)
    for t in (5, 20, 39):
        changed_qk, changed_v, changed_buckets = qk.clone(), v.clone(), buckets.clone()
        changed_qk[:, :, t:] += 1.0
        changed_v[:, :, t:] -= 2.0
        changed_buckets[:, :, :, t:] = (buckets[:, :, :, t:] + 1) % 4
        after = lsh_attention_sorted(changed_qk, changed_v, changed_buckets, 4)
        torch.testing.assert_close(after[:, :, :t], out[:, :, :t], atol=1e-12, rtol=0)


def test_the_decode_step_equals_the_full_sequence_at_every_position():
    qk, v, buckets = inputs(23, n_buckets=4)
    full = lsh_attention_sorted(qk, v, buckets, 5)
    keys = F.normalize(qk, dim=-1)
    for t in range(23):  # token t reads, per round, the 5 most recent keys of its bucket (itself among them)
        same = buckets[..., : t + 1] == buckets[..., t : t + 1]  # (b, h, r, t + 1)
        slots = torch.full((*buckets.shape[:3], 5), -1)
        for index in itertools.product(*map(range, buckets.shape[:3])):
            recent = same[index].nonzero()[-5:, 0]
            slots[index][: len(recent)] = recent
        step = lsh_decode_attention(qk[:, :, t : t + 1], keys, v, slots, t)
        torch.testing.assert_close(step[:, :, 0], full[:, :, t], atol=1e-12, rtol=0)


def test_float64_gradients_match_finite_differences():
    qk, v, buckets = inputs(11, h=1, d=4, e=3, n_buckets=4, n_rounds=2)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lsh_attention_sorted(a, b, buckets, 3), (qk, v))


def lsh_model(**options) -> HybridLM:
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, layers="R", n_heads=4, ffn="none",
                         mixer_options={"R": options})
    return HybridLM(config).eval()


@torch.no_grad()
def test_the_mixer_after_prefill_decodes_the_full_forward_and_survives_select_and_cat():
    model = lsh_model(n_buckets=4, n_rounds=2, chunk_size=4)
    ids = torch.randint(0, 64, (3, 15))
    full = model(ids).logits
    state = model.init_state(3)
    model(ids[:, :9], state=state)
    state = type(state).cat([state.select(torch.tensor([2])), state.select(torch.tensor([0, 1]))])
    steps = [model(ids[[2, 0, 1], t : t + 1], state=state).logits for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full[[2, 0, 1], 9:], atol=1e-5, rtol=0)
    assert state.nbytes()["lsh_attention"] == state.total_nbytes() > 0


@torch.no_grad()
def test_a_left_padded_prefill_decodes_each_sequence_as_alone_after_select_and_cat():
    model = lsh_model(n_buckets=2, n_rounds=2, chunk_size=3)
    short, long = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :6] = False
    state = model.init_state(2)
    model(batch, attention_mask=mask, state=state)
    state = type(state).cat([state.select(torch.tensor([1])), state.select(torch.tensor([0]))])  # [long, short]
    nxt = torch.randint(0, 64, (2, 4))
    steps = torch.cat([model(nxt[:, t : t + 1], state=state).logits for t in range(4)], 1)
    for row, ids in ((0, long), (1, short)):
        alone = model(torch.cat([ids, nxt[row : row + 1]], 1)).logits[:, -4:]
        torch.testing.assert_close(steps[row : row + 1], alone, atol=1e-5, rtol=0)


def test_rotations_are_drawn_from_the_seed_and_kept_by_a_checkpoint(tmp_path):
    a, b = lsh_model(seed=3), lsh_model(seed=3)
    torch.testing.assert_close(a.layers[0].mixer.rotations, b.layers[0].mixer.rotations, atol=0, rtol=0)
    assert not torch.equal(lsh_model(seed=4).layers[0].mixer.rotations, a.layers[0].mixer.rotations)
    a.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (1, 30))
    torch.testing.assert_close(HybridLM.from_pretrained(tmp_path / "ckpt")(ids).logits, a(ids).logits, atol=0,
                               rtol=0)


@pytest.mark.parametrize("options,field", [
    (dict(n_buckets=3), "n_buckets"), (dict(n_buckets=0), "n_buckets"), (dict(chunk_size=0), "chunk_size"),
    (dict(n_rounds=1.5), "n_rounds"), (dict(buckets=4), "buckets"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=rf"mixer_options\['R'\]\.{field}"):
        lsh_model(**options)


def test_grouped_key_value_heads_are_refused():
    with pytest.raises(ValueError, match="n_kv_heads.*shares queries and keys"):
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, layers="R", n_heads=4, n_kv_heads=2)

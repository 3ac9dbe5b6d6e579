"""Property tests of the sampler over the whole float range: for every valid temperature (0 .. the largest float,
subnormals included), top_p in (0, 1] and top_k >= 1, and any finite logits, ``sample`` returns a valid token id and
``filter_logits`` keeps at least one token, with no NaN and no exception."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.generation import filter_logits, sample

VOCAB = 7
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
logits_rows = st.lists(st.lists(finite, min_size=VOCAB, max_size=VOCAB), min_size=1, max_size=3)
temperatures = st.one_of(st.floats(min_value=0, allow_nan=False, allow_infinity=False),
                         st.sampled_from([0.0, 5e-324, 1e-45, 1e-38, 1e-7, 1.0, 2.0, 1e38, 1.7976931348623157e308]))
top_ps = st.one_of(st.none(), st.floats(min_value=0, max_value=1, exclude_min=True, allow_nan=False),
                   st.sampled_from([5e-324, 1e-45, 1e-12, 0.5, 1.0]))
top_ks = st.one_of(st.none(), st.integers(min_value=1, max_value=VOCAB + 3))


@settings(max_examples=300, deadline=None)
@given(rows=logits_rows, temperature=temperatures, top_p=top_ps, top_k=top_ks, seed=st.integers(0, 2**32 - 1))
def test_sample_always_returns_a_valid_token(rows, temperature, top_p, top_k, seed):
    logits = torch.tensor(rows, dtype=torch.float32)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(rows))]
    for gens in (generators, None):
        tokens = sample(logits, temperature, top_k, top_p, gens)
        assert tokens.shape == (len(rows),) and tokens.dtype == torch.long
        assert bool(((tokens >= 0) & (tokens < VOCAB)).all()), tokens
        if float(torch.tensor(temperature, dtype=torch.float32)) == 0:  # greedy
            assert tokens.tolist() == logits.argmax(-1).tolist()
            continue
        # never a token the filters masked (as sample applies them: after the shift and the temperature)
        shifted = (logits - logits.amax(-1, keepdim=True)).clamp(min=torch.finfo(torch.float32).min)
        kept = filter_logits(shifted / temperature, top_k, top_p)
        assert bool(torch.isfinite(kept.gather(1, tokens[:, None])).all()), (kept, tokens)


@settings(max_examples=300, deadline=None)
@given(rows=logits_rows, top_p=top_ps, top_k=top_ks)
def test_filter_logits_keeps_the_top_token_and_makes_no_nan(rows, top_p, top_k):
    logits = torch.tensor(rows, dtype=torch.float32)
    out = filter_logits(logits, top_k, top_p)
    assert not bool(out.isnan().any())
    assert bool(torch.isfinite(out.gather(1, logits.argmax(-1, keepdim=True))).all())


def test_a_spread_wider_than_float32_at_an_infinite_temperature_samples():
    # found by hypothesis: the shifted logits overflow to -inf, and -inf / inf (1e308 in float32) was NaN
    logits = torch.tensor([[3e38, -3e38, 0.0]])
    tokens = sample(logits, 1e308, None, None, [torch.Generator().manual_seed(0)])
    assert 0 <= int(tokens[0]) < 3

"""One request can never break another's: the sampler is safe over the whole range of its parameters, seeds outside
64 bits are refused, and a failure in one row of a decode batch ends that request alone."""

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import TOKENIZER, reference, tiny_model

from hybridlm.generation import sample
from hybridlm.serve.protocol import ApiError, Limits, sampling_params
from hybridlm.serve.scheduler import GenerationRequest, SamplingParams, Scheduler

LOGITS = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 5


@settings(max_examples=300, deadline=None)
@given(temperature=st.floats(0, 2, allow_subnormal=True), top_p=st.floats(0, 1, allow_subnormal=True,
                                                                           exclude_min=True))
def test_the_sampler_gives_a_valid_token_for_every_temperature_and_top_p(temperature, top_p):
    tokens = sample(LOGITS, temperature, None, top_p, [torch.Generator().manual_seed(i) for i in range(3)])
    assert tokens.shape == (3,) and ((tokens >= 0) & (tokens < 40)).all()
    if temperature < 1e-30 or top_p < 1e-30:  # greedy in effect: only the top token has mass left
        assert torch.equal(tokens, LOGITS.argmax(-1))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_outside_64_bits_are_refused_naming_the_field(seed):
    with pytest.raises(ApiError, match=r"seed: expected an integer from -9223372036854775808 to "
                                       r"18446744073709551615 \(64 bits\)") as e:
        sampling_params({"seed": seed}, 3, Limits(), 259)
    assert e.value.status == 400
    for edge in (2**64 - 1, -(2**63)):
        params = sampling_params({"seed": edge}, 3, Limits(), 259)
        torch.Generator().manual_seed(params.seed)  # what the scheduler does with it


def run(scheduler, requests):
    done = {id(r): threading.Event() for r in requests}
    events = {id(r): [] for r in requests}
    for r in requests:
        def on_event(kind, payload, r=r):
            events[id(r)].append((kind, payload))
            if kind in ("done", "error"):
                done[id(r)].set()
        r.on_event = on_event
    with scheduler.hold():  # all of them join one batch, however slowly the test thread submits
        for r in requests:
            scheduler.submit(r)
    for r in requests:
        assert done[id(r)].wait(60), "a request never ended"
    return events


def test_held_requests_wait_and_then_decode_as_one_batch_while_calls_still_run():
    model = tiny_model("llama-tiny")
    prompts = [f"request {i}" for i in range(4)]
    want = [reference(model, p, 8, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    requests = [GenerationRequest(TOKENIZER.encode(p, add_bos=True), SamplingParams(8, 1.0, seed=i), None)
                for i, p in enumerate(prompts)]
    ended = threading.Semaphore(0)
    for r in requests:
        r.on_event = lambda kind, payload: kind in ("done", "error") and ended.release()
    scheduler = Scheduler(model, TOKENIZER, max_batch=8).start()
    try:
        with scheduler.hold():
            for r in requests:
                scheduler.submit(r)
            assert scheduler.call(lambda: "ran").result(timeout=30) == "ran"  # a call is not held
            time.sleep(0.2)
            assert scheduler.queue_depth == 4 and scheduler.forward_calls == 0 and not any(r.tokens for r in requests)
        assert all(ended.acquire(timeout=60) for _ in requests), "a request never ended"
    finally:
        scheduler.close()
    assert [r.tokens for r in requests] == want and all(len(w) == 8 for w in want)
    # 4 prefills, then 7 decode steps of all four rows (none stops early: each made its 8 tokens)
    assert scheduler.forward_calls == 4 + 7 and scheduler.batched_rows == 4 * 7


def test_a_poisoned_request_ends_alone_while_the_others_stream_exactly_as_alone(monkeypatch):
    model = tiny_model("mamba-tiny")
    prompts = [f"tenant {i} says hello" for i in range(5)]
    want = [reference(model, p, 12, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
    requests = [GenerationRequest(TOKENIZER.encode(p, add_bos=True), SamplingParams(12, 1.0, seed=i), None)
                for i, p in enumerate(prompts)]
    poisoned = requests[2]
    sample_row = Scheduler._sample

    def failing_sample(request, logits, vocab):  # its first token samples fine; its first decode step fails
        if request is poisoned and request.tokens:
            raise FloatingPointError("probability tensor contains either inf, nan or element < 0")
        return sample_row(request, logits, vocab)

    monkeypatch.setattr(Scheduler, "_sample", staticmethod(failing_sample))
    scheduler = Scheduler(model, TOKENIZER, max_batch=8).start()
    try:
        # all five join one batch: the poisoned one fails inside the batch's decode step
        events = run(scheduler, requests)
        tiny = GenerationRequest(TOKENIZER.encode(prompts[0], add_bos=True), SamplingParams(12, 3.5115e-39, seed=1),
                                 None)
        tiny_events = run(scheduler, [tiny])
    finally:
        scheduler.close()
    assert poisoned.finish_reason == "error"
    assert events[id(poisoned)][-1][0] == "error" and "FloatingPointError" in events[id(poisoned)][-1][1]
    for i, r in enumerate(requests):
        if r is not poisoned:
            assert r.finish_reason in ("length", "stop") and r.tokens == want[i], f"request {i}"
    # A temperature too small for float32 is greedy, not a NaN
    assert tiny_events[id(tiny)][-1][0] == "done" and tiny.tokens == reference(model, prompts[0], 12, temperature=0)


def test_admission_counts_free_batch_slots_before_refusing():
    from hybridlm.serve.scheduler import QueueFull

    scheduler = Scheduler(tiny_model("mamba-tiny"), TOKENIZER, max_batch=8, max_queue=2)  # not started: none runs
    requests = [GenerationRequest([1, 2], SamplingParams(2), lambda kind, payload: None) for _ in range(11)]
    for r in requests[:10]:  # 8 free slots + a queue of 2
        scheduler.submit(r)
    with pytest.raises(QueueFull):
        scheduler.submit(requests[10])

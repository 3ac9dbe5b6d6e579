"""Load: 64 concurrent streaming clients, batched vs one-at-a-time throughput, state bytes per active stream, and a
flood of 200 requests on a small queue (429 with Retry-After, recovery, one audit record a request)."""

import asyncio
import contextlib
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serve_helpers import TOKENIZER, reference, tiny_model  # noqa: E402

from hybridlm.serve import Limits, create_app  # noqa: E402
from hybridlm.serve.app import BackgroundServer  # noqa: E402

N_CLIENTS, N_TOKENS = 64, 24  # 64 streams through a batch of 32: half of them queue first


def prompt(i: int) -> str:
    return f"client {i}: " + "abcdefghij"[: i % 10] * (1 + i % 4)  # lengths 10 .. 49 bytes


async def stream_all(url: str) -> tuple[list[list[int]], list[str], float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[list[int], str]:
        chunks = [c async for c in await client.completions.create(
            model="m", prompt=prompt(i), max_tokens=N_TOKENS, temperature=1.0, seed=i, stream=True,
            extra_body={"return_token_ids": True})]
        return chunks[-1].choices[0].token_ids, "".join(c.choices[0].text for c in chunks)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(N_CLIENTS)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    await client.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {N_CLIENTS} streams failed, first: {errors[0]!r}"
    return [r[0] for r in results], [r[1] for r in results], elapsed


def count_concurrent_forwards(model) -> dict[str, int]:
    """Wrap model.forward to record the most threads ever inside it at once."""
    seen, lock, inner = {"now": 0, "max": 0, "calls": 0}, threading.Lock(), model.forward

    def forward(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["calls"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    model.forward = forward
    return seen


@pytest.mark.parametrize("preset", ["llama-tiny", "mamba2-tiny"])
def test_64_concurrent_streams_equal_their_sequential_results_and_batching_is_faster(preset):
    model = tiny_model(preset)
    want = [reference(model, prompt(i), N_TOKENS, temperature=1.0, seed=i) for i in range(N_CLIENTS)]
    seen = count_concurrent_forwards(model)
    limits = Limits(max_context=256, max_tokens=64)
    elapsed = {32: float("inf"), 1: float("inf")}
    # Each mode twice, interleaved, the faster run of each kept: a burst of load on a shared machine during one run
    # (it happened: 0.93x) then cannot decide the ratio alone.
    for max_batch in (32, 1, 32, 1):
        app = create_app({"m": model}, limits=limits, max_batch=max_batch, max_queue=64)
        with BackgroundServer(app) as server:
            got, texts, seconds = asyncio.run(stream_all(server.url))
            elapsed[max_batch] = min(elapsed[max_batch], seconds)
            rows = app.state.schedulers["m"].batched_rows
            steps = app.state.schedulers["m"].forward_calls
        assert got == want, f"max_batch={max_batch}: a stream differs from its sequential result"
        assert texts == [TOKENIZER.decode(w) for w in want]
        if max_batch == 32:
            decode_steps = steps - N_CLIENTS  # one prefill per request, the rest are batched decode steps
            assert rows / decode_steps > 4, "decode steps were not batched"
    assert seen["max"] == 1 and seen["calls"] > 0
    tokens = sum(map(len, want))
    ratio = elapsed[1] / elapsed[32]
    print(f"\n{preset}: {N_CLIENTS} streams x {N_TOKENS} tokens: batched {tokens / elapsed[32]:.0f} tok/s, "
          f"one at a time {tokens / elapsed[1]:.0f} tok/s, ratio {ratio:.1f}x")
    assert ratio > 1.0


def _metrics(url: str) -> dict[str, int]:
    """One scrape of /metrics: the gauges of the one model served, by name."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("hybridlm_") and '{model="m"}' in line:
            out[line.split("{")[0].removeprefix("hybridlm_")] = int(float(line.split()[-1]))
    return out


MAX_TOKENS = 512  # long enough that no stream ends while the metrics are read


def state_bytes_per_stream(model, context: int, streams: int = 4) -> int:
    """state_bytes_per_stream from /metrics while ``streams`` requests with ``context``-token prompts decode."""
    app = create_app({"m": model}, limits=Limits(max_context=context + MAX_TOKENS, max_tokens=MAX_TOKENS))
    body = {"model": "m", "prompt": "x" * (context - 1), "max_tokens": MAX_TOKENS, "stream": True,
            "logit_bias": {str(TOKENIZER.eos_token_id): -100}}  # no early stop: every stream stays active
    with BackgroundServer(app) as server, httpx.Client(timeout=60) as http, contextlib.ExitStack() as stack:
        responses = [stack.enter_context(http.stream("POST", server.url + "/v1/completions", json=body))
                     for _ in range(streams)]
        lines = [r.iter_lines() for r in responses]  # kept referenced: a dropped iterator closes its stream
        for it in lines:
            next(it)
        deadline = time.monotonic() + 60
        while (m := _metrics(server.url))["active_streams"] < streams and time.monotonic() < deadline:
            time.sleep(0.005)
        assert m["active_streams"] == streams
        assert m["state_bytes_per_stream"] == m["state_bytes"] // streams
        return m["state_bytes_per_stream"]


def test_state_bytes_per_active_stream_mamba_constant_transformer_grows():
    llama, mamba = tiny_model("llama-tiny"), tiny_model("mamba-tiny")
    fixed = mamba.init_state(1).total_nbytes()
    kv_per_token = llama.init_state(1, max_len=1).total_nbytes()  # K and V of one position, every layer
    short, long = 256, 4096
    per_stream = {(name, n): state_bytes_per_stream(m, n) for name, m in (("llama", llama), ("mamba", mamba))
                  for n in (short, long)}
    for (name, n), b in per_stream.items():
        print(f"\n{name}-tiny, context {n}: {b} bytes of state per active stream")
    ratio = per_stream[("llama", long)] / per_stream[("mamba", long)]
    print(f"at context {long} a Transformer stream holds {ratio:.0f}x the state of a Mamba stream")
    assert per_stream[("mamba", short)] == per_stream[("mamba", long)] == fixed
    # The KV cache holds every position, plus room the batch reserves for the tokens its requests may still
    # generate (up to MAX_TOKENS beyond the longest row, which itself may be up to MAX_TOKENS past its prompt);
    # key_valid adds a byte per position.
    for n in (short, long):
        assert n * kv_per_token <= per_stream[("llama", n)] <= (n + 2 * MAX_TOKENS) * (kv_per_token + 1)
    assert per_stream[("llama", long)] - per_stream[("llama", short)] >= (long - short) * kv_per_token
    assert per_stream[("llama", long)] > 100 * per_stream[("mamba", long)]


def test_200_concurrent_requests_on_a_small_queue_get_429_with_retry_after_and_each_is_audited_once(tmp_path):
    from hybridlm.serve import AuditLog
    from hybridlm.serve.audit import query

    path = tmp_path / "audit.jsonl"
    app = create_app({"m": tiny_model("llama-tiny")}, audit_log=AuditLog(path),
                     limits=Limits(max_context=128, max_tokens=8), max_batch=2, max_queue=4)
    n = 200

    async def flood(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "model": "m", "prompt": f"request {i}", "max_tokens": 8}) for i in range(n)))

    with BackgroundServer(app) as server:
        start = time.perf_counter()
        responses = asyncio.run(flood(server.url))
        elapsed = time.perf_counter() - start
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and statuses.count(200) >= 6  # the batch and the queue were served
        for r in refused:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        # recovered: a normal request afterwards is served
        after = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "after", "max_tokens": 4},
                           timeout=60)
        assert after.status_code == 200 and httpx.get(server.url + "/health").status_code == 200
    records = query(path)
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r["status"])
    assert sorted(by_prompt) == sorted([f"request {i}" for i in range(n)] + ["after"])
    assert all(len(s) == 1 for s in by_prompt.values())  # one record a request, refused ones included
    assert sorted(s for p, [s] in by_prompt.items() if p != "after") == sorted(statuses)
    print(f"\n{n} concurrent requests, max_batch 2, max_queue 4: {statuses.count(200)} served, {len(refused)} "
          f"refused with 429 in {elapsed:.1f} s")

"""A composition of experts served as one model: routed once per request, batched by expert, the same text as
``CompositionOfExperts.generate`` under concurrent load; the answering expert in a header, the body, the audit
log and /metrics; a role allowed the composition without its experts by name."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from serve_helpers import read_line, tiny_model  # noqa: E402

import hybridlm  # noqa: E402
from hybridlm.chat_template import ChatTemplate  # noqa: E402
from hybridlm.coe import CompositionOfExperts  # noqa: E402
from hybridlm.coe.build import build  # noqa: E402
from hybridlm.serve import AuditLog, AuthConfig, Limits, ServedComposition, create_app, new_api_key  # noqa: E402
from hybridlm.serve.app import EXPERT_HEADER, BackgroundServer, load_served_model  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402
from hybridlm.serve.scheduler import Scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CODE = ["def f(x):\n    return x", "import os\nos.path.join(a, b)", "for i in range(10):\n    print(i)",
        "class A:\n    def __init__(self):", "if x is None:\n    return []", "lambda y: y + 1  # add",
        "try:\n    pass\nexcept ValueError:", "while True:\n    break"]
PROSE = ["The cat sat quietly on the warm mat.", "Rivers flow slowly toward the distant sea.",
         "She walked home under a sky of stars.", "Many people enjoy reading in the evening.",
         "The old house stood alone on the hill.", "Birds sang as the morning sun rose.",
         "He wrote a long letter to his friend.", "Children laughed in the green park."]
PROBES = CODE[5:] + PROSE[5:]  # not among the calibration prompts
# The prose expert's own chat template: a composition's chat must be rendered by the answering expert's.
PROSE_TEMPLATE = ChatTemplate(message="### {role}\n{content}\n", generation_prompt="### assistant\n",
                              stop=["\n### user"])
KEYS = {"admin": new_api_key(), "analyst": new_api_key()}


def labels_file(path, prompts_by_expert):
    path.write_text("".join(json.dumps({"prompt": p, "expert": e}) + "\n"
                            for e, prompts in prompts_by_expert.items() for p in prompts))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("coe")
    experts = {"code": root / "code", "prose": root / "prose"}
    tiny_model("llama-tiny", 1).save_pretrained(experts["code"])
    tiny_model("mamba-tiny", 2).save_pretrained(experts["prose"])
    (experts["prose"] / "chat_template.json").write_text(PROSE_TEMPLATE.to_json())
    data = labels_file(root / "d.jsonl", {"code": CODE[:5], "prose": PROSE[:5]})
    # "coe": routed on the code expert's embedding (the router runs a model a scheduler also decodes with)
    out = {"coe": build(root / "coe", experts, data, router="knn", k=1, embedder="code"), "experts": experts}
    # "fb": n-grams, k 5, a threshold between the probes' confidences, so that some fall back
    plain = CompositionOfExperts.from_pretrained(build(root / "plain", experts, data, router="knn", k=5))
    names, confidences = plain.route(PROBES, apply_fallback=False)
    low = min(range(len(PROBES)), key=confidences.__getitem__)
    fallback = next(n for n in experts if n != names[low])  # so that falling back changes the answer
    out["fb"] = build(root / "fb-dir", experts, data, router="knn", k=5, fallback=fallback,
                      threshold=(min(confidences) + max(confidences)) / 2)
    return out


@pytest.fixture(scope="module")
def refs(dirs):
    """The compositions loaded apart from the served ones: the reference, never run by a server thread."""
    return {name: CompositionOfExperts.from_pretrained(dirs[name]) for name in ("coe", "fb")}


def count_concurrent_forwards(model) -> dict[str, int]:
    """Wrap model.forward to record the most threads ever inside it at once."""
    seen, lock, inner = {"now": 0, "max": 0}, threading.Lock(), model.forward

    def forward(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        try:
            return inner(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    model.forward = forward
    return seen


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    (d / "auth.toml").write_text(f"""
[[keys]]
principal = "root"
role = "admin"
sha256 = "{KEYS['admin'][1]}"

[[keys]]
principal = "ana"
role = "coe-only"
sha256 = "{KEYS['analyst'][1]}"

[roles.coe-only]
endpoints = ["models", "completions", "chat"]
models = ["coe"]
""")
    served = {"coe": load_served_model(str(dirs["coe"])),  # served under its directory's name
              "fb": load_served_model(f"fb={dirs['fb']}"),  # or NAME=DIR's
              "code": load_served_model(f"code={dirs['experts']['code']}")}  # an expert also served by name
    assert isinstance(served["coe"], ServedComposition) and served["fb"].name == "fb"
    seen = count_concurrent_forwards(served["coe"].coe.experts["code"].model)
    audit = AuditLog(d / "audit.jsonl")
    app = create_app(served, AuthConfig.load(d / "auth.toml"), audit, Limits(max_context=512, max_tokens=64),
                     max_batch=16)
    with BackgroundServer(app) as srv:
        srv.app, srv.audit, srv.embedder_forwards = app, audit, seen
        yield srv


def post(server, path, body, who="admin"):
    """The response, and for a streamed one its chunks too."""
    headers = {"Authorization": f"Bearer {KEYS[who][0]}"}
    if body.get("stream"):
        with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=60) as r:
            return r, [json.loads(line[6:]) for line in r.iter_lines()
                       if line.startswith("data: ") and line != "data: [DONE]"]
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def expert_metrics(server) -> dict[tuple[str, str, str], int]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin'][0]}"}).text
    out = {}
    for line in text.splitlines():
        if line.startswith("hybridlm_expert_requests_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1: line.index("}")].split(","))
            out[(labels["model"].strip('"'), labels["expert"].strip('"'), labels["fell_back"].strip('"'))] = \
                int(line.split()[-1])
    return out


def test_concurrent_requests_equal_generate_with_the_chosen_expert(server, refs):
    coe = refs["coe"]
    jobs = [(p, seed) for seed in (1, 2) for p in PROBES]  # 12 requests at once, both experts
    want = [coe.generate(p, 24, temperature=1.0, seed=seed) for p, seed in jobs]
    assert {w.expert for w in want} == {"code", "prose"}
    before = expert_metrics(server)
    schedulers = server.app.state.expert_schedulers["coe"]
    per_expert = {name: sum(w.expert == name for w in want) for name in schedulers}  # requests each answers

    def counters(scheduler):
        return scheduler.batched_rows, scheduler.forward_calls

    counted = {name: counters(s) for name, s in schedulers.items()}
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def call(i):
        prompt, seed = jobs[i]
        barrier.wait()
        results[i] = post(server, "/v1/completions", {"model": "coe", "prompt": prompt, "max_tokens": 24,
                                                      "seed": seed, "return_token_ids": True})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    # Hold both experts until every request waits in its queue: on a loaded machine one request can otherwise be
    # routed, decoded and answered before the next arrives (it happened in CI), and nothing would be batched.
    with contextlib.ExitStack() as holds:
        for scheduler in schedulers.values():
            holds.enter_context(scheduler.hold())
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while any(schedulers[name].queue_depth < n for name, n in per_expert.items()):
            assert time.monotonic() < deadline, "the requests never all reached their experts' queues"
            time.sleep(0.01)
    for t in threads:
        t.join()
    for (prompt, _), w, r in zip(jobs, want, results, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers[EXPERT_HEADER] == body["expert"] == w.expert == coe.choose(prompt).expert
        assert (body["routed_expert"], body["fell_back"]) == (w.routed_expert, False)
        assert body["model"] == "coe"
        assert body["choices"][0]["token_ids"] == w.token_ids
        assert body["choices"][0]["text"] == w.text
    # Batching grouped the requests by expert: each expert's scheduler decoded several rows per step.
    for name, scheduler in schedulers.items():
        rows, calls = (a - b for a, b in zip(counters(scheduler), counted[name], strict=True))
        decode_steps = calls - per_expert[name]  # one prefill per request, then decode steps
        assert rows > decode_steps, f"{name}: no decode step had two requests"
    # The router's embedding forwards ran on the embedder's model thread, never beside its decoding.
    assert server.embedder_forwards["max"] == 1
    after = expert_metrics(server)
    for name in ("code", "prose"):
        assert after.get(("coe", name, "false"), 0) - before.get(("coe", name, "false"), 0) == per_expert[name]
    records = [r for r in query(server.audit.path) if r.get("model") == "coe" and r.get("status") == 200]
    by_prompt = {p: w.expert for (p, _), w in zip(jobs, want, strict=True)}
    assert len(records) >= len(jobs)
    for record in records:
        assert record["expert"] == by_prompt[record["prompt"]] and record["fell_back"] is False
        assert record["routed_expert"] == record["expert"] and 0 < record["confidence"] <= 1


def test_streaming_names_the_expert_in_the_header_and_every_chunk(server, refs):
    coe = refs["coe"]
    prompt = PROBES[0]
    want = coe.generate(prompt, 16, temperature=0)
    r, chunks = post(server, "/v1/completions", {"model": "coe", "prompt": prompt, "max_tokens": 16,
                                                 "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers[EXPERT_HEADER] == want.expert
    assert chunks and all(c["expert"] == want.expert and c["fell_back"] is False for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text


def test_chat_is_routed_on_the_last_user_message_and_uses_that_experts_template(server, refs):
    coe = refs["coe"]
    import torch

    users = [next(p for p in PROBES if coe.choose(p).expert == name) for name in ("prose", "code")]
    for user in users:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi."}, {"role": "user", "content": user}]
        expert = coe.experts[coe.choose(user).expert]
        ids = expert.tokenizer.encode(expert.chat_template.render(messages), add_bos=True)
        out = expert.model.generate(torch.tensor([ids]), 12, temperature=0,
                                    eos_token_id=expert.tokenizer.eos_token_id)
        want = expert.tokenizer.decode(out[0, len(ids):].tolist())
        for stream in (False, True):
            r = post(server, "/v1/chat/completions", {"model": "coe", "messages": messages, "max_tokens": 12,
                                                      "temperature": 0, "stream": stream})
            if stream:
                r, chunks = r
                assert all(c["expert"] == expert.name for c in chunks)
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            else:
                assert r.json()["usage"]["prompt_tokens"] == len(ids)  # the answering expert's template
                text = r.json()["choices"][0]["message"]["content"]
            assert r.headers[EXPERT_HEADER] == expert.name
            assert text == want
    assert coe.experts["prose"].chat_template == PROSE_TEMPLATE != coe.experts["code"].chat_template
    bad = post(server, "/v1/chat/completions", {"model": "coe", "messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and "messages[0].role" in bad.json()["error"]["message"]


def test_below_the_threshold_the_fallback_answers_and_is_reported(server, refs):
    fb = refs["fb"]
    routings = [fb.choose(p) for p in PROBES]
    low = next(p for p, r in zip(PROBES, routings, strict=True) if r.fell_back)
    high = next(p for p, r in zip(PROBES, routings, strict=True) if not r.fell_back)
    before = expert_metrics(server)
    r = post(server, "/v1/completions", {"model": "fb", "prompt": low, "max_tokens": 8, "seed": 3})
    want = fb.generate(low, 8, seed=3)
    body = r.json()
    assert r.headers[EXPERT_HEADER] == body["expert"] == fb.fallback == want.expert
    assert body["fell_back"] is True and body["routed_expert"] == want.routed_expert != fb.fallback
    assert body["choices"][0]["text"] == want.text
    assert post(server, "/v1/completions", {"model": "fb", "prompt": high, "max_tokens": 2}).json()["fell_back"] \
        is False
    after = expert_metrics(server)
    assert after[("fb", fb.fallback, "true")] - before.get(("fb", fb.fallback, "true"), 0) == 1
    [record] = [x for x in query(server.audit.path) if x.get("model") == "fb" and x.get("prompt") == low]
    assert (record["expert"], record["routed_expert"], record["fell_back"]) == (fb.fallback, want.routed_expert,
                                                                               True)
    assert record["confidence"] == pytest.approx(want.confidence) and record["confidence"] < fb.threshold


def test_a_role_may_use_the_composition_without_its_experts_by_name(server, refs):
    ok = post(server, "/v1/completions", {"model": "coe", "prompt": CODE[0], "max_tokens": 2}, who="analyst")
    assert ok.status_code == 200 and ok.headers[EXPERT_HEADER] in ("code", "prose")
    refused = post(server, "/v1/completions", {"model": "code", "prompt": CODE[0], "max_tokens": 2}, who="analyst")
    assert refused.status_code == 403 and "may not use model 'code'" in refused.json()["error"]["message"]
    assert EXPERT_HEADER not in refused.headers
    assert post(server, "/v1/completions", {"model": "code", "prompt": CODE[0], "max_tokens": 2}).status_code == 200
    headers = {"Authorization": f"Bearer {KEYS['analyst'][0]}"}
    cards = httpx.get(server.url + "/v1/models", headers=headers).json()["data"]
    assert [c["id"] for c in cards] == ["coe"]
    assert list(cards[0]["composition"]["experts"]) == ["code", "prose"]
    assert cards[0]["composition"]["embedder"] == "code"
    admin = {"Authorization": f"Bearer {KEYS['admin'][0]}"}
    assert sorted(c["id"] for c in httpx.get(server.url + "/v1/models", headers=admin).json()["data"]) == \
        ["code", "coe", "fb"]
    # An error after routing still says who would have answered (a 400 here; a full expert queue's 429 alike).
    too_long = post(server, "/v1/completions", {"model": "coe", "prompt": PROBES[0], "max_tokens": 65})
    assert too_long.status_code == 400 and too_long.headers[EXPERT_HEADER] == refs["coe"].choose(PROBES[0]).expert
    missing = post(server, "/v1/completions", {"model": "coe/code", "prompt": "x"})
    assert missing.status_code == 404 and "['code', 'coe', 'fb']" in missing.json()["error"]["message"]


def test_scheduler_call_runs_on_the_model_thread_and_returns_or_raises():
    scheduler = Scheduler(tiny_model("llama-tiny"), name="m").start()
    try:
        assert scheduler.call(lambda: threading.current_thread().name).result(10) == "hybridlm-scheduler-m"
        with pytest.raises(ZeroDivisionError):
            scheduler.call(lambda: 1 / 0).result(10)
    finally:
        scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.call(lambda: None)


def test_the_serve_command_serves_a_coe_directory_as_one_model(dirs, refs, tmp_path):
    cmd = [sys.executable, "-m", "hybridlm.cli", "serve", f"mix={dirs['coe']}", "--port", "0",
           "--audit-log", str(tmp_path / "audit.jsonl"), "--max-context", "256", "--max-tokens", "16"]
    # The process imports the hybridlm this test imports (not another install), wherever it runs from.
    env = {**os.environ, "PYTHONPATH": str(Path(hybridlm.__file__).parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        url = read_line(proc, 120).split(": ", 1)[1]
        assert [m["id"] for m in httpx.get(url + "/models").json()["data"]] == ["mix"]
        want = refs["coe"].generate(PROBES[0], 8, seed=5)
        r = httpx.post(url + "/completions", json={"model": "mix", "prompt": PROBES[0], "max_tokens": 8, "seed": 5},
                       timeout=60)
        assert r.headers[EXPERT_HEADER] == r.json()["expert"] == want.expert
        assert r.json()["choices"][0]["text"] == want.text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)

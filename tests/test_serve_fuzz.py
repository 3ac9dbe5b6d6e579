"""Fuzzing the live server from its own OpenAPI schema (schemathesis): valid and invalid bodies, paths and queries
for every operation. No 500, no hang, and /health plus a normal completion still work afterwards. The default run is
bounded (under ~30 s); ``-m slow`` runs a larger one."""

import collections
import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from serve_helpers import tiny_model  # noqa: E402

from hybridlm.serve import AuditLog, AuthConfig, Limits, create_app, new_api_key  # noqa: E402
from hybridlm.serve.app import BackgroundServer  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402

KEY, DIGEST = new_api_key()
HEADERS = {"Authorization": f"Bearer {KEY}"}


def fuzz(tmp_path, examples: int) -> collections.Counter:
    (tmp_path / "auth.toml").write_text(f'[[keys]]\nprincipal = "ops"\nrole = "admin"\nsha256 = "{DIGEST}"\n')
    log = AuditLog(tmp_path / "audit.jsonl")
    app = create_app({"m": tiny_model("llama-tiny")}, AuthConfig.load(tmp_path / "auth.toml"), log,
                     Limits(max_context=256, max_tokens=8, body_timeout=5), allowed_hosts=["127.0.0.1"])
    statuses: collections.Counter = collections.Counter()
    with BackgroundServer(app) as server:
        assert httpx.get(server.url + "/v1/openapi.json").status_code == 401  # the schema needs a credential
        document = httpx.get(server.url + "/v1/openapi.json", headers=HEADERS).json()
        schema = schemathesis.openapi.from_dict(document)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/audit"}
        slowest = 0.0
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    nonlocal slowest
                    start = time.monotonic()
                    response = case.call(base_url=server.url, headers=HEADERS, timeout=30)
                    slowest = max(slowest, time.monotonic() - start)
                    statuses[response.status_code] += 1
                    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

                try:
                    check()
                except Unsatisfiable:  # nothing to get wrong: an operation with no parameters, in negative mode
                    assert mode is GenerationMode.NEGATIVE
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        done = httpx.post(server.url + "/v1/completions", headers=HEADERS, timeout=60,
                          json={"model": "m", "prompt": "still here", "max_tokens": 4})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    assert not [r for r in query(log.path) if (r.get("status") or 0) >= 500]
    print(f"\nfuzz: {sum(statuses.values())} requests over {len(operations)} operations, statuses "
          f"{dict(sorted(statuses.items()))}, slowest {slowest:.2f} s")
    assert slowest < 30
    return statuses


def test_fuzzing_from_the_openapi_schema_finds_no_500_and_the_server_stays_up(tmp_path):
    statuses = fuzz(tmp_path, examples=40)
    assert statuses[200] and statuses[400]  # both valid and refused requests were made


@pytest.mark.slow
def test_fuzzing_longer(tmp_path):
    fuzz(tmp_path, examples=300)

"""The audit log survives a crash: ``hybridlm serve`` killed with SIGKILL while streams are running leaves a log
(rotated files included) of whole JSON lines in which every admitted request is visible; the restarted server
reads it, appends to it, and rotates it as its auth file says."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from test_serve_cli import read_line  # noqa: E402

import hybridlm  # noqa: E402
from hybridlm.serve import new_api_key  # noqa: E402
from hybridlm.serve.audit import log_files, query  # noqa: E402

KEY, DIGEST = new_api_key()
HEADERS = {"Authorization": f"Bearer {KEY}"}


def auth_file(tmp_path: Path, name: str, audit: str) -> Path:
    path = tmp_path / name
    path.write_text(f'[[keys]]\nprincipal = "ops"\nrole = "admin"\nsha256 = "{DIGEST}"\n\n'
                    f'[audit]\npath = "audit.jsonl"\n{audit}')
    return path


def start(tmp_path: Path, auth: Path) -> tuple[subprocess.Popen, str]:
    """``hybridlm serve`` as a process of its own (this worktree's code, one thread), and its base URL."""
    env = {**os.environ, "PYTHONPATH": str(Path(hybridlm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hybridlm.cli", "serve", "m=llama-tiny", "--port", "0", "--auth", str(auth),
           "--max-context", "2048", "--max-tokens", "1500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    line = read_line(proc, 120)
    assert line.startswith("hybridlm serve: http://127.0.0.1:"), line
    return proc, line.split(": ", 1)[1].removesuffix("/v1")


def every_line(path: Path) -> list[dict]:
    """Every line of the log and its rotated files, each of which must be one JSON object."""
    records = []
    for file in log_files(path):
        data = file.read_bytes()
        assert data.endswith(b"\n"), f"{file.name}: its last line is cut"
        for n, line in enumerate(data.splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"{file.name}:{n} is not JSON: {line[:200]!r}") from None
    return records


def test_kill_9_mid_stream_leaves_every_admitted_request_in_a_valid_log_and_restart_appends(tmp_path):
    log = tmp_path / "audit.jsonl"
    # small files, many kept: the crash happens across rotated files and nothing is deleted yet
    first = auth_file(tmp_path, "auth.toml", "max_bytes = 2048\nbackups = 100\nfsync_seconds = 0\n")
    proc, url = start(tmp_path, first)
    streams = []
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as http:
            for i in range(6):  # finished requests
                r = http.post("/v1/completions", json={"model": "m", "prompt": f"done {i}", "max_tokens": 4})
                assert r.status_code == 200
            # running streams, kept from ending (end of text is never sampled), read a few events each
            body = {"model": "m", "max_tokens": 1500, "stream": True, "logit_bias": {"257": -100}}
            for i in range(4):
                ctx = http.stream("POST", "/v1/completions", json={**body, "prompt": f"stream {i}"})
                response = ctx.__enter__()
                assert response.status_code == 200
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                streams.append((ctx, lines))
            for _, lines in streams:
                next(lines)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            for ctx, lines in streams:  # each stream ends cut off, without its [DONE]
                try:
                    rest = list(lines)
                except httpx.HTTPError:  # the chunked body cut mid-way
                    rest = []
                assert "data: [DONE]" not in rest
                ctx.__exit__(None, None, None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    records = every_line(log)
    assert len(log_files(log)) >= 3, "the records should span rotated files"
    seen = query(log)
    prompts = {r["prompt"]: r for r in seen if r["endpoint"] == "completions"}
    assert sorted(prompts) == sorted([f"done {i}" for i in range(6)] + [f"stream {i}" for i in range(4)])
    for i in range(6):
        assert prompts[f"done {i}"]["status"] == 200
    for i in range(4):  # never ended: visible by their admission record
        assert prompts[f"stream {i}"]["admitted"] is True and "status" not in prompts[f"stream {i}"]
        assert prompts[f"stream {i}"]["principal"] == "ops"
    print(f"\nafter kill -9: {len(log_files(log))} files, {len(records)} lines, all JSON; "
          f"{len(seen)} requests, 4 of them admitted and never ended; torn: {list(tmp_path.glob('*.torn-*'))}")

    # Restarted with a tighter rotation: the old records are readable through the server before any is removed.
    second = auth_file(tmp_path, "auth2.toml", "max_bytes = 1024\nbackups = 1\nkeep_seconds = 0\n")
    proc, url = start(tmp_path, second)
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as http:
            listed = http.get("/v1/audit", params={"limit": 1000}).json()["data"]
            assert {r["prompt"] for r in listed if r["endpoint"] == "completions"} == set(prompts)
            for i in range(8):
                assert http.post("/v1/completions", json={"model": "m", "prompt": f"after {i}",
                                                          "max_tokens": 2}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    every_line(log)
    files = log_files(log)
    assert len(files) <= 2, [f.name for f in files]  # backups = 1, and old files may go at once (keep_seconds = 0)
    assert query(log)[-1]["prompt"] == "after 7"


def test_audit_config_names_a_bad_key_and_fsync_policies_write_the_same_lines(tmp_path):
    from hybridlm.serve import AuditLog

    with pytest.raises(ValueError, match=r"\[audit\]: unknown keys \['max_byte'\]"):
        AuditLog.from_config({"max_byte": 10})
    with pytest.raises(ValueError, match=r"\[audit\].backups: expected an integer"):
        AuditLog.from_config({"backups": "5"})
    with pytest.raises(ValueError, match="fsync_seconds"):
        AuditLog(tmp_path / "x.jsonl", fsync_seconds=-1)
    for policy in (0, 0.05, "never"):
        log = AuditLog.from_config({"fsync_seconds": policy}, tmp_path / f"{policy}.jsonl")
        for i in range(20):
            log.write({"request_id": i, "prompt": "p", "output": "o"})
        time.sleep(0.1)  # the interval policy's timer has run
        assert log._sync_timer is None or policy == "never"
        log.close()
        assert [r["request_id"] for r in every_line(log.path)] == list(range(20))

"""Data-privacy guardrails of the audit log: a redaction policy from the auth file (built-in patterns, custom ones,
hashes only) applied before anything is written, so a redacted value is in no file on disk, rotated ones included;
and retention by age."""

import hashlib
import os
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from serve_helpers import tiny_model  # noqa: E402

from hybridlm.serve import AuditLog, AuthConfig, Limits, create_app, new_api_key  # noqa: E402
from hybridlm.serve.app import BackgroundServer  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402
from hybridlm.serve.redaction import Redaction  # noqa: E402

SECRETS = ["alice.smith@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "4111-1111-1111-1111",
           "ACME-123456"]


def raw_bytes(directory) -> bytes:
    """Every byte of every file in ``directory``: the log, its rotated and torn files, anything else."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_redacted_values_reach_no_file_through_the_server(tmp_path):
    key, digest = new_api_key()
    (tmp_path / "auth.toml").write_text(
        f'[[keys]]\nprincipal = "alice"\nrole = "admin"\nsha256 = "{digest}"\n\n[audit]\npath = "logs/audit.jsonl"\n'
        'max_bytes = 1024\nbackups = 50\n[audit.redact]\nbuiltin = ["email", "phone", "card"]\n'
        "patterns = ['ACME-\\d{6}']\n")
    auth = AuthConfig.load(tmp_path / "auth.toml")
    log = AuditLog.from_config(auth.audit)
    app = create_app({"m": tiny_model("llama-tiny")}, auth, log, Limits(max_context=256, max_tokens=4))
    prompt = "Mail " + SECRETS[0] + ", call " + SECRETS[1] + ", card " + SECRETS[2] + " / " + SECRETS[3] + \
        ", order " + SECRETS[4]
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                       headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(6):
            assert http.post("/v1/completions", json={"model": "m", "prompt": f"{i}: {prompt}",
                                                      "max_tokens": 2}).status_code == 200
            r = http.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200
        # refused requests are audited too, with their prompts
        assert http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 99}).status_code == 400
    log.close()
    logs = tmp_path / "logs"
    assert len(list(logs.glob("audit.jsonl.*"))) >= 3  # rotated files are checked too
    data = raw_bytes(logs)
    for secret in SECRETS:
        assert secret.encode() not in data, secret
    assert b"4111" not in data and b"example.com" not in data
    records = [r for r in query(logs / "audit.jsonl") if r["endpoint"] == "completions"]
    assert records[0]["prompt"] == "0: Mail [email], call [phone], card [card] / [card], order [redacted]"
    chats = [r for r in query(logs / "audit.jsonl") if r["endpoint"] == "chat"]
    assert chats[0]["prompt"][0]["content"] == "Mail [email], call [phone], card [card] / [card], order [redacted]"


def test_outputs_and_errors_are_redacted_and_hashes_only_keeps_no_text(tmp_path):
    record = {"prompt": [{"role": "user", "content": "bob@example.org"}], "output": "reach me at bob@example.org",
              "error": "messages: 'bob@example.org' refused", "status": 400}
    log = AuditLog(tmp_path / "a.jsonl", redaction=Redaction.from_config({"builtin": ["email"]}))
    log.write(record)
    hashed = AuditLog(tmp_path / "h.jsonl", redaction=Redaction.from_config({"hashes_only": True}))
    hashed.write(record)
    assert b"bob@example.org" not in raw_bytes(tmp_path)
    [r] = query(tmp_path / "a.jsonl")
    assert r["output"] == "reach me at [email]" and r["error"] == "messages: '[email]' refused"
    [h] = query(tmp_path / "h.jsonl")
    text = b"reach me at bob@example.org"
    assert h["output"] == {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    assert set(h["prompt"]) == {"sha256", "bytes"} and h["error"] == "messages: [value] refused"


@pytest.mark.parametrize("config, message", [
    ({"builtin": ["ssn"]}, r"redact.builtin: expected a list of"),
    ({"patterns": ["("]}, r"redact.patterns\[0\]: not a regular expression"),
    ({"hashes_only": "yes"}, r"redact.hashes_only: expected true or false"),
    ({"mask": True}, r"redact: unknown keys \['mask'\]"),
])
def test_a_bad_redaction_policy_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        AuditLog.from_config({"redact": config})


def test_retention_removes_files_older_than_the_limit_whatever_backups_say(tmp_path):
    path = tmp_path / "audit.jsonl"
    old = time.time() - 3 * 86_400
    for name in ("audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.torn-1"):
        (tmp_path / name).write_text('{"old": true}\n')
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "audit.jsonl.3").write_text('{"recent": true}\n')
    path.write_text('{"current": true}\n')
    log = AuditLog(path, backups=10, retention_days=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.3"]
    os.utime(tmp_path / "audit.jsonl.3", (old, old))  # ages while the server runs: gone at the next rotation
    log.max_bytes = 1024
    for i in range(40):
        log.write({"i": i, "prompt": "x" * 50})
    assert not (tmp_path / "audit.jsonl.4").exists() and not (tmp_path / "audit.jsonl.3").read_text().startswith(
        '{"recent"')
    os.utime(path, (old, old))  # a current file whose last record is too old goes at start-up
    AuditLog(path, retention_days=2)
    assert not path.exists()
    with pytest.raises(ValueError, match="retention_days"):
        AuditLog(path, retention_days=0)

"""The command line: ``hybridlm serve`` run as a process (a checkpoint directory and a preset, each under its
name, a checkpoint's own chat template), its start-up errors, and ``hybridlm audit`` on a rotated log."""

import calendar
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402
from serve_helpers import read_line, reference, tiny_model  # noqa: E402

from hybridlm import HybridLM, ModelConfig  # noqa: E402
from hybridlm.chat_template import ChatTemplate  # noqa: E402
from hybridlm.cli import main  # noqa: E402
from hybridlm.serve import AuditLog  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402

TEMPLATE = {"message": "### {role}: {content}\n", "generation_prompt": "### assistant:", "stop": ["\n###"]}


def test_serve_command_serves_a_checkpoint_and_a_preset_under_their_names(tmp_path):
    checkpoint = tmp_path / "my-mamba"
    model = tiny_model("mamba-tiny")
    model.save_pretrained(checkpoint)
    (checkpoint / "chat_template.json").write_text(json.dumps(TEMPLATE))
    audit = tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "hybridlm.cli", "serve", str(checkpoint), "small=llama-tiny", "--port", "0",
           "--seed", "3", "--audit-log", str(audit), "--max-context", "256", "--max-tokens", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        line = read_line(proc, 120)
        assert line.startswith("hybridlm serve: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert sorted(m.id for m in client.models.list()) == ["my-mamba", "small"]

        # The checkpoint's chat_template.json, not the default one, renders the messages.
        messages = [{"role": "user", "content": "Hello"}]
        prompt = ChatTemplate(**TEMPLATE).render(messages)
        assert prompt == "### user: Hello\n### assistant:"
        want = reference(model, prompt, 12, temperature=0)
        chat = client.chat.completions.create(model="my-mamba", messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"return_token_ids": True})
        assert chat.choices[0].token_ids == want and chat.usage.prompt_tokens == len(prompt) + 1

        # A preset is initialised from --seed, so the same seed gives the same model here.
        torch.manual_seed(3)
        preset = HybridLM(ModelConfig.preset("llama-tiny")).eval()
        want = reference(preset, "abc", 8, temperature=0)
        done = client.completions.create(model="small", prompt="abc", max_tokens=8, temperature=0,
                                         extra_body={"return_token_ids": True})
        assert done.choices[0].token_ids == want
        with pytest.raises(openai.BadRequestError, match="at most 32"):  # --max-tokens
            client.completions.create(model="small", prompt="abc", max_tokens=33)
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["models"] == ["my-mamba", "small"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    records = query(audit)
    assert [(r["model"], r["status"]) for r in records] == [(None, 200), ("my-mamba", 200), ("small", 200),
                                                            ("small", 400)]


@pytest.mark.parametrize("argv, message", [
    (["llama-tiny", "llama-tiny"], "a second model named 'llama-tiny'"),
    (["llama2-7b"], "describe-only"),
    (["no-such-preset"], "no-such-preset"),
])
def test_serve_command_start_up_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["serve", *argv, "--port", "0", "--audit-log", str(tmp_path / "a.jsonl")])


def _log(path: Path) -> list[dict]:
    """A rotated audit log: alice and bob, one request a minute from 10:00, some refused."""
    log = AuditLog(path, max_bytes=1024, backups=10)
    records = []
    for i in range(12):
        record = {"time": f"2026-03-01T10:{i:02d}:00.000Z", "principal": "alice" if i % 3 else "bob",
                  "role": "user", "endpoint": "completions", "model": "m", "prompt": f"prompt {i}", "output": "o",
                  "prompt_tokens": 3, "completion_tokens": 1, "latency_ms": 1.5, "status": 403 if i % 2 == 0 else 200}
        log.write(record)
        records.append(record)
    assert len(list(path.parent.glob(path.name + ".*"))) >= 2  # the records span rotated files
    return records


def test_audit_command_filters_a_rotated_log(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    records = _log(path)

    def run(*args: str) -> list[dict]:
        main(["audit", str(path), "--json", *args])
        return [json.loads(x) for x in capsys.readouterr().out.splitlines()]

    assert run() == records  # every file, oldest first
    assert run("--principal", "bob") == [r for r in records if r["principal"] == "bob"]
    assert run("--status", "403") == [r for r in records if r["status"] == 403]
    window = run("--since", "2026-03-01T10:03:00Z", "--until", "2026-03-01T10:06:00Z")
    assert [r["prompt"] for r in window] == [f"prompt {i}" for i in range(3, 7)]
    assert run("--principal", "alice", "--since", "2026-03-01T10:03:00Z", "--until", "2026-03-01T10:06:00Z") == \
        [r for r in window if r["principal"] == "alice"]
    unix = str(calendar.timegm((2026, 3, 1, 10, 9, 0, 0, 0, 0)))  # Unix seconds work as ISO 8601 does
    assert [r["prompt"] for r in run("--since", unix)] == ["prompt 9", "prompt 10", "prompt 11"]
    assert run("--limit", "2") == records[-2:]

    main(["audit", str(path), "--principal", "bob", "--status", "403"])
    table = capsys.readouterr().out.splitlines()
    want = [r for r in records if r["principal"] == "bob" and r["status"] == 403]
    assert len(want) == 2 and len(table) == len(want)  # 10:00 and 10:06
    for line, r in zip(table, want, strict=True):
        assert line.startswith(f"{r['time']}  403  bob(user)  completions  m  tokens 3+1")
        assert json.dumps(r["prompt"]) in line

    with pytest.raises(SystemExit, match="since"):
        main(["audit", str(path), "--since", "yesterday"])
    with pytest.raises(SystemExit, match="no such audit log"):
        main(["audit", str(tmp_path / "missing.jsonl")])

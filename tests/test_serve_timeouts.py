"""Slow clients: half a request head, a head trickled a byte at a time, half a body. Each is cut off within the
configured time, the body's 408 is audited, and the server keeps answering others meanwhile."""

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from serve_helpers import tiny_model  # noqa: E402

from hybridlm.serve import AuditLog, Limits, create_app  # noqa: E402
from hybridlm.serve.app import BackgroundServer  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402

TIMEOUT = 0.5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    limits = Limits(max_context=128, max_tokens=8, head_timeout=TIMEOUT, body_timeout=TIMEOUT)
    app = create_app({"m": tiny_model("llama-tiny")}, audit_log=AuditLog(path), limits=limits)
    with BackgroundServer(app) as server:
        yield server, path


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def test_half_a_request_head_is_cut_off_within_the_head_timeout(served):
    server, _ = served
    sock = connect(server.url)
    start = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    data, _ = read_until_closed(sock)
    elapsed = time.monotonic() - start
    assert data == b"" and TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2, elapsed


def test_a_head_trickled_a_byte_at_a_time_is_cut_off_too(served):
    # uvicorn's keep-alive timer is cancelled by every byte received; the head deadline is not
    server, _ = served
    sock = connect(server.url)
    start, head = time.monotonic(), b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    closed = False
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.05)
        if time.monotonic() - start > TIMEOUT + 3:
            break
    if not closed:
        assert read_until_closed(sock)[0] == b""
    assert time.monotonic() - start < TIMEOUT + 2


def test_an_idle_keep_alive_connection_after_a_response_gets_the_head_deadline_again(served):
    server, _ = served
    sock = connect(server.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    start = time.monotonic()
    data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - start < TIMEOUT + 2


def test_half_a_body_gets_an_audited_408_within_the_body_timeout(served):
    server, path = served
    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 2}).encode()
    sock = connect(server.url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    # meanwhile another client is answered: the slow one holds a handler, not the server
    assert httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                      timeout=30).status_code == 200
    data, elapsed = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"body_timeout" in data and b"connection: close" in data.lower()
    assert elapsed < TIMEOUT + 2
    refused = [r for r in query(path) if r["status"] == 408]
    assert len(refused) == 1 and refused[0]["endpoint"] == "completions"
    assert "not received within 0.5 s (10 bytes came)" in refused[0]["error"]


def test_limits_name_a_bad_timeout():
    with pytest.raises(ValueError, match="Limits.body_timeout"):
        Limits(body_timeout=0)
    with pytest.raises(ValueError, match="Limits.head_timeout"):
        Limits(head_timeout=float("nan"))

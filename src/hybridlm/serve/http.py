"""The HTTP layer under the app: uvicorn's configuration, and the one deadline uvicorn does not offer.

What uvicorn (0.29 .. 0.55) bounds by its own settings, and what it does not:

- ``timeout_keep_alive``: an idle keep-alive connection is closed that many seconds after its last response. The
  timer is armed only *after a response* and any byte received cancels it, so it never bounds a request being sent.
- ``h11_max_incomplete_event_size``: the bytes of a request head (start line and headers) h11 buffers before a 400;
  it bounds header *size*, not time.
- ``limit_concurrency``: connections plus tasks before a 503; a bound on count.
- There is no header-read timeout and no body-read timeout: a client that opens a connection and sends half a request
  head (or a byte of it every few seconds) holds the connection forever, and one that declares a body and sends part of
  it holds a request handler forever.

So the request head gets a deadline here, in a subclass of uvicorn's own h11 protocol: armed when the connection is
made and again when a response completes (the next request's head must come in time too), cancelled as soon as h11
has parsed a whole head. When it fires the connection is closed; no request exists yet, so there is nothing to audit.
The body's deadline is the app's (``read_body``): there a request exists, so its 408 is answered and audited.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_BYTES = 16_384  # h11's and uvicorn's default, said explicitly: a request head beyond it is a 400


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not whole within ``head_timeout``."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 leaves IDLE once it has parsed a whole request head; bytes trickling in before that do not help
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, head_timeout: float = 10.0, keep_alive: float = 5.0, log_level: str = "info",
                   graceful_shutdown: float = 5.0) -> Any:
    """A ``uvicorn.Config`` for ``app``: the request head must arrive within ``head_timeout`` seconds of the
    connection (or of the previous response), an idle keep-alive connection closes after ``keep_alive`` seconds,
    and a request head is at most ``HEAD_BYTES``."""
    if not head_timeout > 0:
        raise ValueError(f"head_timeout: expected a number of seconds > 0, got {head_timeout!r}")
    protocol = type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"head_timeout": float(head_timeout)})
    return uvicorn.Config(app, http=protocol, log_level=log_level, timeout_keep_alive=keep_alive,
                          h11_max_incomplete_event_size=HEAD_BYTES, timeout_graceful_shutdown=graceful_shutdown)

"""The HTTP server: OpenAI-compatible endpoints over the schedulers, with auth, audit log and metrics.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or server-sent
events with ``"stream": true``), ``GET /v1/audit``, ``GET /v1/openapi.json``, ``GET /metrics``, ``GET /health``.
Every request except ``/health`` is authenticated, authorised and written to the audit log, refused ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hybridlm.chat_template import ChatFormatError
from hybridlm.coe import Routing
from hybridlm.model import HybridLM
from hybridlm.serve.audit import AuditLog, query, utc_now
from hybridlm.serve.auth import AuthConfig, Authenticator, Principal
from hybridlm.serve.http import uvicorn_config
from hybridlm.serve.metrics import Metrics
from hybridlm.serve.models import ServedComposition, ServedModel, chat_routing_text, load_served_model
from hybridlm.serve.protocol import (
    ApiError,
    Limits,
    check_fields,
    completion_object,
    forbidden,
    new_id,
    parse_json_body,
    prompt_text,
    render_chat,
    sampling_params,
    usage,
)
from hybridlm.serve.scheduler import GenerationRequest, QueueFull, Scheduler
from hybridlm.serve.schema import ChatCompletionRequest, CompletionRequest, request_body, served_schema

__all__ = ["BackgroundServer", "ServedComposition", "ServedModel", "create_app", "load_served_model", "run"]

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the response"
EXPERT_HEADER = "X-Hybridlm-Expert"  # on a composition's answers: the expert that answered


# The Host names a server without --auth answers: a page elsewhere in a browser on this machine could otherwise
# reach the local admin through a name of its own that resolves to 127.0.0.1 (DNS rebinding)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def host_name(header: str | None) -> str:
    """The host of a Host header, without its port, lowercased ("[::1]:8000" -> "[::1]")."""
    host = (header or "").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def read_body(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The request's body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (its Content-Length,
    or the bytes received so far): a 20 MB body is never read whole. A body not whole within ``timeout`` seconds
    is a 408 (uvicorn has no body-read timeout of its own): a client sending half a body holds no handler for long."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body: {int(declared):,} bytes, more than this server's limit of {limit:,}",
                       code="body_too_large")
    chunks, size = [], 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body: more than this server's limit of {limit:,} bytes", code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        # Connection: close, since the rest of that body would otherwise be read as the next request
        raise ApiError(408, f"body: not received within {timeout:g} s ({size:,} bytes came)", code="body_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(CLIENT_CLOSED, "client closed the connection before its body was whole") from None
    return b"".join(chunks)


def create_app(models: dict[str, HybridLM | ServedModel | ServedComposition], auth: AuthConfig | None = None,
               audit_log: AuditLog | None = None, limits: Limits | None = None, max_batch: int = 32,
               max_queue: int = 64, allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (name -> model or composition of experts). ``auth=None`` lets every
    caller in as the local admin: only for a server bound to loopback (``run`` enforces it). ``allowed_hosts``:
    the Host names answered (any other gets an audited 400); default the loopback names without ``auth``, any
    with it. Each model, and each expert of a composition, has its own scheduler (so continuous batching groups
    a composition's requests by expert); their threads start with the app and stop with it (its lifespan).

    A composition's request is routed once, on its prompt (chat: its last user message, see
    ``chat_routing_text``), then answered by the chosen expert; the answer carries the expert in the
    ``X-Hybridlm-Expert`` header and in ``expert``, ``routed_expert`` and ``fell_back`` fields of its body (of
    every chunk, streamed), the audit record in the same fields (and ``confidence``), ``/metrics`` in
    ``hybridlm_expert_requests_total``. A role allowed the composition's name may use it whatever its experts
    are called: they are not served under their own names unless given as models too."""
    if allowed_hosts is None and auth is None:
        allowed_hosts = LOOPBACK_HOSTS
    hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
    if not models:
        raise ValueError("models: expected at least one model to serve")
    served: dict[str, ServedModel | ServedComposition] = {
        name: m if isinstance(m, (ServedModel, ServedComposition)) else ServedModel(name, m)
        for name, m in models.items()}
    plain = {name: s for name, s in served.items() if isinstance(s, ServedModel)}
    compositions = {name: s for name, s in served.items() if isinstance(s, ServedComposition)}
    runners = [*plain.values(), *(e for c in compositions.values() for e in c.experts.values())]
    owners: dict[int, str] = {}
    for s in runners:  # one scheduler thread per model: a shared model would run two forwards at once
        if owners.setdefault(id(s.model), s.name) != s.name:
            raise ValueError(f"models: {owners[id(s.model)]!r} and {s.name!r} are the same model object; serve "
                             f"it under one name (or load it twice)")
    for s in runners:
        if s.model.config.vocab_size < s.tokenizer.vocab_size:
            raise ValueError(f"model {s.name}: vocab_size {s.model.config.vocab_size} is smaller than the "
                             f"tokenizer's {s.tokenizer.vocab_size}")
    limits = limits or Limits()
    schedulers = {name: Scheduler(s.model, s.tokenizer, max_batch, max_queue, name) for name, s in plain.items()}
    # composition -> expert -> its scheduler
    expert_schedulers = {name: {e: Scheduler(x.model, x.tokenizer, max_batch, max_queue, x.name)
                                for e, x in c.experts.items()} for name, c in compositions.items()}
    every_scheduler = [*schedulers.values(), *(x for d in expert_schedulers.values() for x in d.values())]
    authenticator = Authenticator(auth)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for s in every_scheduler:
            s.start()
        try:
            yield
        finally:
            for s in every_scheduler:
                s.close()
            if audit_log is not None:
                audit_log.close()

    # redirect_slashes off: "/v1/audit/" is an audited 404, not an unaudited 307 to the real path
    app = FastAPI(title="hybridlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.schedulers, app.state.metrics, app.state.audit_log = schedulers, metrics, audit_log
    app.state.expert_schedulers = expert_schedulers
    app.state.limits = limits

    # ------------------------------------------------------------------------------ request wrapper
    def finish(record: dict[str, Any], status: int, started: float) -> None:
        record["status"] = status
        record["latency_ms"] = round(1000 * (time.monotonic() - started), 1)
        metrics.count_request(record["endpoint"], status)
        if audit_log is not None:
            audit_log.write(record)

    async def handle(request: Request, endpoint: str, work) -> Response:
        """Authenticate, run ``work(request, principal, record)``, turn ApiErrors into OpenAI error bodies,
        and audit. A streaming ``work`` sets ``record['deferred']`` and finishes the record itself."""
        started = time.monotonic()
        record: dict[str, Any] = {
            "time": utc_now(), "request_id": new_id("req"), "method": request.method, "path": request.scope["path"],
            "endpoint": endpoint, "principal": None, "role": None, "auth": None,
            "client": request.client.host if request.client else None, "model": None, "prompt": None,
            "output": None, "prompt_tokens": 0, "completion_tokens": 0, "finish_reason": None, "error": None}
        try:
            if hosts is not None and host_name(request.headers.get("host")) not in hosts:
                raise ApiError(400, f"Host: {request.headers.get('host')!r} is not a name this server answers "
                               f"({sorted(hosts)})", code="host_not_allowed")
            principal = authenticator.authenticate(request.headers.get("authorization"))
            record.update(principal=principal.name, role=principal.role, auth=principal.method)
            response = await work(request, principal, record, started)
        except ApiError as e:
            record["error"] = e.message
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - answer 500 in OpenAI's shape and keep serving
            record["error"] = f"internal error: {type(e).__name__}: {e}"
            response = JSONResponse(ApiError(500, record["error"], "server_error").body(), status_code=500)
        if record.get("expert") is not None:  # a composition's request, routed: whatever the answer, who gave it
            response.headers[EXPERT_HEADER] = record["expert"]
        if not record.pop("deferred", False):
            finish(record, response.status_code, started)
        return response

    def model_for(principal: Principal, endpoint: str, name: Any) -> ServedModel | ServedComposition:
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"model: expected a model name, got {name!r}", param="model")
        principal.require(endpoint, name)  # before the lookup: a refused caller learns nothing of what exists
        if name not in served:
            raise ApiError(404, f"model {name!r} not found; this server has {sorted(served)}", param="model",
                           code="model_not_found")
        return served[name]

    # --------------------------------------------------------------------------------- generation
    async def generate(request: Request, principal: Principal, record: dict[str, Any], started: float,
                       chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        body = parse_json_body(await read_body(request, limits.max_body_bytes, limits.body_timeout))
        check_fields(body, endpoint)
        served_as = model_for(principal, endpoint, body.get("model"))
        record["model"] = served_as.name
        messages = body.get("messages")
        if not chat:
            record["prompt"] = prompt_text(body)
        routed: dict[str, Any] = {}  # a composition's routing, added to each response object
        if isinstance(served_as, ServedComposition):
            try:
                text = chat_routing_text(messages) if chat else record["prompt"]
            except ChatFormatError as e:
                raise ApiError(400, str(e), param="messages") from None
            routing = await route(served_as, text)
            routed = {"expert": routing.expert, "routed_expert": routing.routed_expert,
                      "fell_back": routing.fell_back}
            record.update(routed, confidence=routing.confidence)
            s, scheduler = served_as.experts[routing.expert], expert_schedulers[served_as.name][routing.expert]
        else:
            s, scheduler = served_as, schedulers[served_as.name]
        if chat:
            prompt = render_chat(s.chat_template, messages)
            record["prompt"] = messages  # once the template took them, as for a single model
        else:
            prompt = record["prompt"]
        ids = s.tokenizer.encode(prompt, add_bos=True)
        params = sampling_params(body, len(ids), limits, s.model.config.vocab_size,
                                 extra_stop=s.chat_template.stop if chat else None)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream: expected true or false, got {stream!r}", param="stream")
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        return_ids = body.get("return_token_ids") is True

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_event(kind: str, payload: Any) -> None:  # called on the model thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = GenerationRequest(ids, params, on_event)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        if routed:
            metrics.count_expert(served_as.name, routed["expert"], routed["fell_back"])
        record["prompt_tokens"] = len(ids)
        if audit_log is not None:  # admitted: a crash before it ends still leaves it in the log
            audit_log.write({**record, "admitted": True})
        rid = new_id("chatcmpl" if chat else "cmpl")

        closed = False

        def close_record(status: int, error: str | None = None) -> None:  # once, whichever path ends the stream
            nonlocal closed
            if job.finish_reason is None:  # the client went away: free its batch slot
                job.cancel()
            if not closed:
                closed = True
                record.update(output=job.text, completion_tokens=len(job.tokens),
                              finish_reason=job.finish_reason, error=error)
                finish(record, status, started)

        if stream:
            record["deferred"] = True
            return _EventStream(sse(job, events, rid, served_as.name, chat, include_usage, return_ids, close_record,
                                    routed), on_close=lambda: close_record(CLIENT_CLOSED))
        text_parts: list[str] = []
        next_check = time.monotonic() + 0.25
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    kind = None
                # Checked on a clock, not only when idle: tokens may keep arriving for a client long gone.
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        job.cancel()
                        raise ApiError(CLIENT_CLOSED, "client closed the connection")
                if kind is None:
                    continue
                if kind == "text":
                    text_parts.append(payload)
                elif kind == "error":
                    raise ApiError(500, payload, "server_error")
                else:
                    break
        finally:
            if job.finish_reason is None:
                job.cancel()
            record.update(output=job.text, completion_tokens=len(job.tokens), finish_reason=job.finish_reason)
        return JSONResponse({**completion_object(rid, served_as.name, "".join(text_parts), job.finish_reason,
                                                   chat, usage(len(ids), len(job.tokens)),
                                                   token_ids=list(job.tokens) if return_ids else None), **routed})

    async def route(composition: ServedComposition, text: str) -> Routing:
        """``composition.coe.choose(text)``, off the event loop. With an embedder, on that expert's model thread
        (``Scheduler.call``): the embedding is a forward of a model its scheduler is decoding with, and a forward
        hook catches it, so the two must not overlap. N-gram routing touches no model: a worker thread."""
        coe = composition.coe
        if coe.embedder is None:
            return await asyncio.to_thread(coe.choose, text)
        embedder = expert_schedulers[composition.name][coe.embedder]
        return await asyncio.wrap_future(embedder.call(lambda: coe.choose(text)))

    async def sse(job: GenerationRequest, events: asyncio.Queue, rid: str, model: str, chat: bool,
                  include_usage: bool, return_ids: bool, close_record, routed: dict[str, Any]
                  ) -> AsyncIterator[str]:
        def chunk(*args: Any, **kwargs: Any) -> str:  # every chunk names the answering expert (a composition's)
            return _sse({**completion_object(rid, model, *args, chunk=True, **kwargs), **routed})

        status, error = CLIENT_CLOSED, None
        try:
            if chat:  # OpenAI's first chunk announces the role
                yield chunk("", None, True, first=True)
            while True:
                kind, payload = await events.get()
                if kind == "text":
                    yield chunk(payload, None, chat)
                elif kind == "error":
                    status, error = 500, payload
                    yield _sse(ApiError(500, payload, "server_error").body())
                    break
                else:
                    yield chunk("", job.finish_reason, chat, token_ids=list(job.tokens) if return_ids else None)
                    if include_usage:
                        last = {**completion_object(rid, model, "", None, chat, usage(len(job.prompt_ids),
                                                                                    len(job.tokens)), chunk=True),
                                **routed}
                        last["choices"] = []
                        yield _sse(last)
                    yield "data: [DONE]\n\n"
                    status = 200
                    break
        finally:
            close_record(status, error)

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await handle(request, "completions",
                            lambda req, p, rec, t: generate(req, p, rec, t, chat=False))

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat", lambda req, p, rec, t: generate(req, p, rec, t, chat=True))

    # ------------------------------------------------------------------------------------ the rest
    def model_card(s: ServedModel | ServedComposition) -> dict[str, Any]:
        card = {"id": s.name, "object": "model", "created": s.created, "owned_by": "hybridlm"}
        if isinstance(s, ServedComposition):
            return {**card, "composition": s.card()}
        return {**card, "layers": s.model.config.layers}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def work(req, principal: Principal, record, t) -> Response:
            principal.require("models")
            visible = [model_card(s) for name, s in served.items()
                       if principal.allows("completions", name) or principal.allows("chat", name)]
            return JSONResponse({"object": "list", "data": visible})
        return await handle(request, "models", work)

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> Response:
        async def work(req, principal: Principal, record, t) -> Response:
            principal.require("models")
            if not (principal.allows("completions", name) or principal.allows("chat", name)):
                # 403 whether or not it exists (as for completions): a refused caller learns nothing
                raise forbidden(f"role {principal.role} may not use model {name!r}")
            if name not in served:
                raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found")
            record["model"] = name
            return JSONResponse(model_card(served[name]))
        return await handle(request, "models", work)

    @app.get("/v1/audit")
    async def audit(request: Request) -> Response:
        async def work(req, principal: Principal, record, t) -> Response:
            principal.require("audit")
            if audit_log is None:
                raise ApiError(404, "this server keeps no audit log", code="audit_disabled")
            q = req.query_params
            record["prompt"] = dict(q)
            try:
                status = None if q.get("status") is None else _int_param(q["status"], "status")
                limit = _int_param(q.get("limit", "100"), "limit")
                if not 1 <= limit <= 10000:
                    raise ValueError(f"limit: expected 1..10000, got {limit}")
                records = await asyncio.to_thread(query, audit_log.path, q.get("principal"), q.get("since"),
                                                  q.get("until"), status, limit)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            return JSONResponse({"object": "list", "data": records})
        return await handle(request, "audit", work)

    @app.get("/v1/openapi.json")
    async def openapi(request: Request) -> Response:
        # Behind a credential and audited (FastAPI's own /openapi.json is off): the schema is not secret, but an
        # endpoint map is reconnaissance, and a role may be given "openapi" for client generators.
        async def work(req, principal: Principal, record, t) -> Response:
            principal.require("openapi")
            return JSONResponse(served_schema(app.openapi(), sorted(served)))
        return await handle(request, "openapi", work)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        async def work(req, principal: Principal, record, t) -> Response:
            principal.require("metrics")
            return PlainTextResponse(metrics.render(schedulers, expert_schedulers),
                                     media_type="text/plain; version=0.0.4")
        return await handle(request, "metrics", work)

    @app.get("/health")
    async def health() -> Response:  # for load balancers' probes: no credential, not audited
        return JSONResponse({"status": "ok", "models": sorted(served)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # unknown paths and methods: OpenAI's error shape, audited like everything else
        async def work(req, principal, record, t) -> Response:
            raise ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                           code="not_found" if exc.status_code == 404 else None)
        return await handle(request, "other", work)

    return app


class _EventStream(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends, even when the client left before
    the first event (then the generator never starts, so its own ``finally`` cannot clean up)."""

    def __init__(self, content: AsyncIterator[str], on_close) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------ running
def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind(host: str, port: int, authenticated: bool) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port). Without auth only loopback is allowed."""
    if not authenticated and not is_loopback(host):
        raise ValueError(f"--host {host}: without --auth the server only binds to loopback (127.0.0.1, ::1, "
                         f"localhost); give --auth FILE to serve other hosts")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    sock.listen(2048)
    return sock


def _head_timeout(app: FastAPI) -> float:
    limits = getattr(app.state, "limits", None)  # an app not made by create_app: the default
    return limits.head_timeout if limits is not None else Limits().head_timeout


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, authenticated: bool = False,
        log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve ``app`` until interrupted (prints the URL once bound); ``sock``: one already made by ``bind``."""
    import uvicorn

    sock = sock or bind(host, port, authenticated)
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    print(f"hybridlm serve: http://{url_host}:{bound[1]}/v1", flush=True)
    uvicorn.Server(uvicorn_config(app, _head_timeout(app), log_level=log_level)).run(sockets=[sock])


class BackgroundServer:
    """``app`` served by uvicorn on a thread, on 127.0.0.1 and a free port (tests, notebooks).

    ``with BackgroundServer(app) as server: OpenAI(base_url=server.url + "/v1", ...)``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.sock = bind(host, 0, authenticated=False)
        port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, _head_timeout(app), log_level="warning",
                                                    graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

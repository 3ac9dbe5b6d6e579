"""Continuous batching: the decode steps of all running requests of one model share one forward.

One thread per model owns the model: it is the only thread that calls its forward. Between two decode steps
requests join (their prompt is prefilled alone, then their state is stacked into the running batch with
``InferenceState.cat``) and leave (finished, cancelled or failed; ``InferenceState.select`` keeps the others).
Each request samples with its own generator, so its tokens do not depend on its batch neighbours and equal
``model.generate`` with the same seed.

Other work that needs the model's forward (a composition's router embedding a prompt with one of its experts)
goes through ``call``: it runs on the model thread between two steps, so the rule "one thread calls the forward"
has no exception, and no second copy of the weights is needed.

Requests wait in a bounded queue; ``submit`` raises ``QueueFull`` when it is full (the server answers 429).
Results go back through a callback, ``on_event(kind, payload)``, called on the model thread; the server turns
it into an asyncio queue per request.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from hybridlm.generation import sample
from hybridlm.model import HybridLM
from hybridlm.state import InferenceState
from hybridlm.tokenizer import ByteTokenizer


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"server busy: {waiting} requests already waiting for this model")
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    """What one request asks for (validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


T = TypeVar("T")

# on_event(kind, payload): ("text", str delta) per accepted piece of text, then exactly one of
# ("done", GenerationRequest) or ("error", str message).
EventCallback = Callable[[str, object], None]


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: EventCallback
    # Set by the scheduler as the request runs:
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the accepted output text (stop string excluded)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _emitted: int = 0  # characters of text already sent
    _decoded: str = ""  # text of tokens[:_decoded_upto], which end on a whole character
    _decoded_upto: int = 0
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """Runs one model for many concurrent requests; see the module docstring."""

    def __init__(self, model: HybridLM, tokenizer: ByteTokenizer | None = None, max_batch: int = 32,
                 max_queue: int = 64, name: str = "model") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: expected an integer >= 1, got {max_batch!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue: expected an integer >= 0, got {max_queue!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer or ByteTokenizer()
        self.max_batch, self.max_queue, self.name = max_batch, max_queue, name
        self._waiting: deque[GenerationRequest] = deque()
        self._active: list[GenerationRequest] = []
        self._batch: InferenceState | None = None
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._holds = 0  # while > 0, waiting requests are not admitted (see ``hold``)
        self._forward_guard = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"hybridlm-scheduler-{name}", daemon=True)
        # Counters read by the metrics endpoint (written only by the model thread).
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.forward_calls = 0
        self.batched_rows = 0
        self.state_bytes = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self._recent_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the model thread; requests still queued or running end with an error event."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------------- submission
    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; raises ``QueueFull`` when ``max_queue`` requests are already waiting."""
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            # Waiting room: the queue, plus the batch slots free now (they take a request at the next step)
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._active)):
                # Retry once the running batch has had time to turn over: ~1 s per full queue of a batch.
                raise QueueFull(len(self._waiting), retry_after=max(1, len(self._waiting) // self.max_batch))
            self._waiting.append(request)
            self._cv.notify()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the model thread before its next step; its result (or exception) comes back through the
        returned future (``asyncio.wrap_future`` awaits it). For work that runs the model outside a request: it
        must never overlap the batch's forward (hooks, lazily built caches and the ``_forward`` guard assume one
        caller). ``fn`` delays that step, so it should be short (one prompt's forward, not a generation)."""
        future: Future[T] = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Admit no waiting request until the block ends; those submitted meanwhile then join one batch.

        Running requests go on decoding and ``call`` work still runs (a composition routes prompts with an
        expert's model, so holding that expert must not hold its router). For measuring batching with a known
        batch, and for tests that need requests to overlap however slowly they arrive."""
        with self._cv:
            self._holds += 1
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_streams(self) -> int:
        return len(self._active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        with self._recent_lock:
            return sum(n for t, n in self._recent if now - t <= window) / window

    # ------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._active or self._calls or (self._waiting and not self._holds)):
                        self._cv.wait()
                    if self._stop:
                        break
                    free = 0 if self._holds else self.max_batch - len(self._active)
                    joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as e:  # noqa: BLE001 - the caller gets it; the batch goes on
                            future.set_exception(e)
                try:
                    self._step(joining)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
                    for request in [*self._active, *joining]:
                        if request.finish_reason is None:
                            self._fail(request, f"internal error: {type(e).__name__}: {e}")
                    self._active, self._batch, self.state_bytes = [], None, 0
        finally:
            with self._cv:
                leftover = [*self._active, *self._waiting]
                self._waiting.clear()
                calls = list(self._calls)
                self._calls.clear()
            for _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the server is shutting down"))
            for request in leftover:
                if request.finish_reason is None:
                    self._fail(request, "the server is shutting down")
            self._active, self._batch = [], None

    @torch.no_grad()
    def _step(self, joining: list[GenerationRequest]) -> None:
        vocab = self.model.config.vocab_size
        tokens_before = self.generated_tokens
        # 1. Prefill each joining request alone and sample its first token.
        new_states: list[InferenceState] = []
        new_requests: list[GenerationRequest] = []
        for request in joining:
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                # Room for the prompt only: joining the batch copies the cache into one sized for the batch.
                state = self.model.init_state(1, max_len=len(request.prompt_ids))
                ids = torch.tensor([request.prompt_ids], dtype=torch.long,
                                   device=self.model.embedding.weight.device)
                logits = self._forward(ids, state)
                self.prompt_tokens += len(request.prompt_ids)
                request.first_token_at = time.monotonic()
                # An unseeded request must not share (or disturb) the global generator.
                seed = secrets.randbits(63) if request.params.seed is None else request.params.seed
                request._generator = torch.Generator(device=ids.device).manual_seed(seed)
                if self._accept(request, self._sample(request, logits[0], vocab)):
                    new_states.append(state)
                    new_requests.append(request)
            except Exception as e:  # noqa: BLE001 - one bad request must not take the others down
                self._fail(request, f"{type(e).__name__}: {e}")

        # 2. Leave: drop finished / cancelled rows; join: stack the new states under the running ones.
        keep = [i for i, r in enumerate(self._active) if r.finish_reason is None and not r.cancelled]
        for r in self._active:
            if r.finish_reason is None and r.cancelled:
                self._finish(r, "cancelled")
        if len(keep) < len(self._active) or new_states:
            parts = []
            if keep:
                parts.append(self._batch.select(keep) if len(keep) < len(self._active) else self._batch)
            parts += new_states
            self._active = [self._active[i] for i in keep] + new_requests
            self._batch = InferenceState.cat(parts, capacity=self._capacity(parts)) if parts else None
            self.state_bytes = 0 if self._batch is None else self._batch.total_nbytes()
        if not self._active:
            self._count_step(self.generated_tokens - tokens_before)
            return

        # 3. One decode step for every running request: its last token in, its next token out.
        last = torch.tensor([[r.tokens[-1]] for r in self._active], dtype=torch.long,
                            device=self.model.embedding.weight.device)
        logits = self._forward(last, self._batch)
        for row, request in enumerate(self._active):
            if request.cancelled:
                continue  # dropped at the next step
            try:
                self._accept(request, self._sample(request, logits[row], vocab))
            except Exception as e:  # noqa: BLE001 - one row's failure (NaN logits, ...) ends that request alone
                self._fail(request, f"{type(e).__name__}: {e}")  # and it leaves the batch at the next step
        self.batched_rows += len(self._active)
        self.state_bytes = self._batch.total_nbytes()
        self._count_step(self.generated_tokens - tokens_before)

    def _capacity(self, parts: list[InferenceState]) -> int:
        # KV positions the stacked batch will need: the longest cache now plus the most tokens any request
        # may still add (requests leave before they exceed it), so the cache never regrows mid-batch.
        longest = max(max((s.length for s in p.layers), default=0) for p in parts)
        remaining = max(r.params.max_tokens - len(r.tokens) for r in self._active)
        return longest + remaining

    def _forward(self, ids: torch.Tensor, state: InferenceState) -> torch.Tensor:
        # ids: (b, l) -> logits of the last position (b, padded_vocab) float32
        if not self._forward_guard.acquire(blocking=False):
            raise RuntimeError("the model's forward was entered from two threads at once")
        try:
            self.forward_calls += 1
            return self.model(ids, state=state, logits_to_keep=1).logits[:, -1].float()
        finally:
            self._forward_guard.release()

    @staticmethod
    def _sample(request: GenerationRequest, logits: torch.Tensor, vocab: int) -> int:
        # logits: (padded_vocab,) -> one token id, exactly as generation.stream samples a row
        logits = logits[None].clone()
        logits[:, vocab:] = float("-inf")  # vocabulary padding is never sampled
        for token, bias in request.params.logit_bias.items():
            logits[0, token] += bias
        p = request.params
        return int(sample(logits, p.temperature, None, p.top_p, [request._generator])[0])

    # ------------------------------------------------------------------------ per-request bookkeeping
    def _accept(self, request: GenerationRequest, token: int) -> bool:
        """Record ``token`` for ``request``, send the text that became final; False once it finished."""
        request.tokens.append(token)
        self.generated_tokens += 1
        # Decode only the tokens after the last whole character (the byte tokenizer splits characters).
        piece = self.tokenizer.decode(request.tokens[request._decoded_upto:])
        text = request._decoded + piece
        if not piece.endswith("\ufffd"):
            request._decoded, request._decoded_upto = text, len(request.tokens)
        finish = None
        for stop in request.params.stop:
            at = text.find(stop, max(0, len(request.text) - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None:
            if token == self.tokenizer.eos_token_id:
                finish = "stop"
            elif len(request.tokens) >= request.params.max_tokens:
                finish = "length"
        request.text = text
        if finish is not None:
            self._emit(request, len(text))
            self._finish(request, finish)
            return False
        # Hold back an unfinished multi-byte character and any tail that may still grow into a stop string.
        safe = len(text) - (1 if text.endswith("\ufffd") else 0)
        for stop in request.params.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k: safe] == stop[:k]:
                    safe -= k
                    break
        self._emit(request, safe)
        return True

    def _emit(self, request: GenerationRequest, upto: int) -> None:
        if upto > request._emitted:
            delta = request.text[request._emitted: upto]
            request._emitted = upto
            self._send(request, "text", delta)

    def _finish(self, request: GenerationRequest, reason: str) -> None:
        request.finish_reason = reason
        self._send(request, "done", request)

    def _fail(self, request: GenerationRequest, message: str) -> None:
        request.finish_reason = "error"
        self._send(request, "error", message)

    @staticmethod
    def _send(request: GenerationRequest, kind: str, payload: object) -> None:
        try:
            request.on_event(kind, payload)
        except Exception:  # noqa: BLE001 - a closed client connection must not stop the model thread
            request.cancel()

    def _count_step(self, tokens: int) -> None:
        now = time.monotonic()
        with self._recent_lock:
            if tokens:
                self._recent.append((now, tokens))
            while self._recent and now - self._recent[0][0] > 60:
                self._recent.popleft()

"""The OpenAI wire format: request validation, error bodies, chat prompts, response objects.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for
anything the client can fix.

The chat template is ``hybridlm.chat_template`` (shared with post-training); ``render_chat`` answers its
errors as 400s.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hybridlm.chat_template import ChatFormatError, ChatTemplate
from hybridlm.serve.scheduler import SamplingParams


class ApiError(Exception):
    """An error answered to the client as an OpenAI-style body with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", code="forbidden")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body: expected UTF-8 encoded JSON, got an invalid byte at offset {e.start}",
                       code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body: JSON nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    if "\\u" in text and _has_lone_surrogate(body):  # "\ud800" is valid JSON but no UTF-8 text
        raise ApiError(400, "request body: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                       "which is not valid Unicode text", code="invalid_encoding")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: nesting depth is the client's choice
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False


def render_chat(template: ChatTemplate, messages: Any) -> str:
    """The prompt for ``messages``; a message list the template refuses is a 400 naming the field."""
    try:
        return template.render(messages)
    except ChatFormatError as e:
        raise ApiError(400, str(e), param="messages") from None


# ------------------------------------------------------------------------------------- parameters
@dataclass
class Limits:
    """Server-side bounds on one request."""

    max_context: int = 2048  # prompt + generated tokens
    max_tokens: int = 1024  # generated tokens per request
    default_max_tokens: int = 256  # when a request gives no max_tokens (bounded by max_tokens and the context)
    max_body_bytes: int = 1_048_576  # a request body larger is refused (413) before it is read further
    head_timeout: float = 10.0  # seconds for a request's head (start line, headers) to arrive, else it is closed
    body_timeout: float = 30.0  # seconds for a request's body to arrive once its head has, else a 408

    def __post_init__(self) -> None:
        for name in ("max_context", "max_tokens", "default_max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}: expected a positive integer, got {value!r}")
        for name in ("head_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"Limits.{name}: expected a number of seconds > 0, got {value!r}")


# The request fields this server implements, by endpoint ("user" is OpenAI's caller tag: recorded by nobody, changes
# nothing; "return_token_ids" is ours)
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logit_bias", "stream",
                  "stream_options", "return_token_ids", "user"}
FIELDS = {"completions": _COMMON_FIELDS | {"prompt", "best_of"},
          "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens"}}
# OpenAI fields this server does not implement, with the values that ask for nothing (accepted: some clients send
# them with their defaults); any other value is refused rather than silently ignored
NEUTRAL = {"echo": (False,), "logprobs": (False, None), "top_logprobs": (0, None), "suffix": (None, ""),
           "presence_penalty": (0, None), "frequency_penalty": (0, None), "repetition_penalty": (1, None),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "top_k": (None,),
           "min_p": (None,), "logit_bias_type": (None,)}


def check_fields(body: dict[str, Any], endpoint: str) -> None:
    """Refuse (400 naming it) every field of ``body`` this server would otherwise ignore: an unknown one, or an
    OpenAI feature it does not implement asked for with a value other than its neutral default."""
    for name, value in body.items():
        if name in FIELDS[endpoint]:
            continue
        if name in NEUTRAL:
            if any(_same(value, neutral) for neutral in NEUTRAL[name]):
                continue
            raise ApiError(400, f"{name}: not supported by this server (got {value!r}; only {NEUTRAL[name]!r}, "
                           f"which ask for nothing, are accepted)", param=name)
        raise ApiError(400, f"{name}: unknown field for /v1/{'chat/' if endpoint == 'chat' else ''}completions; "
                       f"this server takes {sorted(FIELDS[endpoint])}", param=name)


def _same(value: Any, neutral: Any) -> bool:
    # JSON equality without Python's True == 1: false is not 0, 0.0 is 0
    if isinstance(neutral, bool) or isinstance(value, bool) or neutral is None:
        return value is neutral
    return type(value) in (int, float) and value == neutral if type(neutral) in (int, float) else value == neutral


def sampling_params(body: dict[str, Any], prompt_tokens: int, limits: Limits, vocab_size: int,
                    extra_stop: list[str] | None = None) -> SamplingParams:
    """Validate the OpenAI sampling fields of ``body`` (400 naming the field) and bound them by ``limits``."""
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):  # null: OpenAI's default, 1
        raise ApiError(400, f"n: only n=1 is supported, got {n!r}", param="n")
    if body.get("best_of", 1) not in (1, None):
        raise ApiError(400, f"best_of: only 1 is supported, got {body['best_of']!r}", param="best_of")
    if prompt_tokens >= limits.max_context:
        raise ApiError(400, f"prompt: {prompt_tokens} tokens, but this server's context is {limits.max_context} "
                       f"tokens (prompt plus completion)", param="prompt", code="context_length_exceeded")
    room = limits.max_context - prompt_tokens
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens, room)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"{key}: expected an integer >= 1, got {max_tokens!r}", param=key)
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}: at most {limits.max_tokens} tokens per request on this server, got "
                       f"{max_tokens}", param=key)
    elif max_tokens > room:
        raise ApiError(400, f"{key}: the prompt ({prompt_tokens} tokens) plus {max_tokens} exceeds this server's "
                       f"context of {limits.max_context} tokens", param=key, code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p: expected a number in (0, 1], got 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ApiError(400, f"seed: expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (64 bits), got "
                       f"{seed!r}", param="seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop: expected a non-empty string or a list of up to 4, got {stop!r}", param="stop")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=None if top_p == 1.0 else top_p,
                          stop=stop + list(extra_stop or []), seed=seed,
                          logit_bias=_logit_bias(body.get("logit_bias"), vocab_size))


# The seeds torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer
SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(400, f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _logit_bias(bias: Any, vocab_size: int) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias: expected an object of token id -> bias in [-100, 100]", param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ApiError(400, f"logit_bias: token id {key!r} is not an integer", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"logit_bias: token id {token} outside [0, {vocab_size})", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key}]: expected a number in [-100, 100], got {value!r}",
                           param="logit_bias")
        out[token] = float(value)
    return out


def prompt_text(body: dict[str, Any]) -> str:
    """The ``prompt`` of a completions request: one string (a one-element list is accepted)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, f"prompt: expected a string, got {type(prompt).__name__}", param="prompt")
    return prompt


# -------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, text: str, finish: str | None, chat: bool,
                      usage_: dict[str, int] | None = None, chunk: bool = False, first: bool = False,
                      token_ids: list[int] | None = None) -> dict[str, Any]:
    """A (chat) completion or a streamed chunk of one. ``token_ids``: the generated ids, added to the choice
    when the request asked ``"return_token_ids": true`` (an extension vLLM also has)."""
    if chat:
        if chunk:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    if token_ids is not None:
        choice["token_ids"] = token_ids
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                           "choices": [choice]}
    if usage_ is not None:
        out["usage"] = usage_
    return out

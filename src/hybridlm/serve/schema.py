"""The OpenAPI description of the request bodies the server accepts, as pydantic models.

They describe; they do not validate. The hand validation in ``protocol`` stays the one judge of a request, so its
400s keep naming the field in the words the tests and clients rely on (pydantic's errors would differ in wording
and in order, and it would coerce "1" to 1 where the server refuses it). A field here is one ``protocol.FIELDS``
accepts; the neutral values of unimplemented OpenAI fields are left out of the schema, since they ask for nothing.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a served model's name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; bounded by --max-tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] | None = Field(None, description="one choice per request")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = Field(False, description="hybridlm's: add the generated token ids")
    user: str | None = None


class CompletionRequest(_Sampling):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="the text to continue (a list of one string is accepted)")
    best_of: Literal[1] | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is read by hand: its request body, described by ``model``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def served_schema(document: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """A copy of FastAPI's ``document`` as served: the ``$defs`` pydantic nests inside each request body moved to
    ``components.schemas`` (where the ``$ref``\\ s made by ``request_body`` point), and each body's ``model``
    limited to the names served (any other is a 404)."""
    document = copy.deepcopy(document)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for path in document.get("paths", {}).values():
        for operation in path.values():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = content.get("schema", {})
            components.update(schema.pop("$defs", {}))
            if "model" in schema.get("properties", {}):
                schema["properties"]["model"]["enum"] = list(models)
    return document

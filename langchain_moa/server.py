"""`moa serve`: MoAs as virtual models behind an OpenAI-compatible API, LangServe and an
inspector page, on one server that protects itself.

Routes (see docs/serving.md):

- ``GET /v1/models``, ``POST /v1/chat/completions``: every served MoA is a model whose id
  is its recipe or config name. The aggregator is the model that answers: ``tools``,
  ``tool_choice``, ``response_format``, ``temperature``, ``max_tokens`` and ``stop`` go to
  it; usage sums every call. Extension: ``"moa": {"drafts": true}`` in the request adds
  the drafts of every layer (``"moa"`` in the response; ``moa.draft`` events, as they
  arrive, in a stream). Errors are OpenAI's error JSON.
- ``/moa/...``: LangServe (invoke, batch, stream and the schemas) for the first served MoA.
  Its other routes are off: ``stream_log`` and ``stream_events`` stream every internal
  run's raw output (a provider's error body included) and the playground runs on
  ``stream_log``; the ``/moa/c/<config hash>/`` copies are off too.
- ``/``: the inspector, a chat page showing every layer's drafts as they arrive.

Protection, in one ASGI middleware in front of every route: a bearer key when
``MOA_SERVE_API_KEY`` is set (browsers may send it as the Basic password), a body-size
limit and a deadline to send it, JSON checks (depth, NaN, lone surrogates), a batch-size
limit, a server-wide bound on MoA runs with a bounded queue (429 with ``Retry-After``
beyond it; every POST is a run, a batch of n is n), a deadline per request, OpenAI's error
JSON for whatever goes wrong, and cancellation of a request's work the moment its client
hangs up, streaming or not.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and
# `Request` is imported inside `create_app` (FastAPI is an optional extra).
import asyncio
import base64
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.runnables import RunnableBinding, RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

from langchain_moa import calls
from langchain_moa.calls import CallResult
from langchain_moa.engine import proposal_of
from langchain_moa.errors import MoAError
from langchain_moa.redaction import one_line

API_KEY_ENV = "MOA_SERVE_API_KEY"
MIN_SERVE_KEY = 16
"""Shortest `MOA_SERVE_API_KEY` `moa serve` takes for a non-loopback host."""
log = logging.getLogger(__name__)
access_log = logging.getLogger("langchain_moa.access")
"""One INFO line per request: method, path (never the query string), status, duration."""
HEALTH_PATH = "/health"
INSPECTOR_HTML = Path(__file__).with_name("inspector.html")

# The LangServe routes served at /moa (the others stream internal runs; see the docstring).
LANGSERVE_ENDPOINTS = ("invoke", "batch", "stream", "input_schema", "output_schema",
                       "config_schema")  # fmt: skip
_CALL_OPTIONS = ("tools", "tool_choice", "response_format", "temperature", "max_tokens", "stop",
                 "parallel_tool_calls", "seed", "top_p")  # fmt: skip
_MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts before it says no (all configurable with `moa serve` flags)."""

    max_body_bytes: int = 1_000_000
    max_batch: int = 32
    """Inputs in one LangServe batch."""
    max_runs: int = 16
    """MoA runs in flight across the server; more wait in the queue."""
    max_queue: int = 64
    """Runs waiting for a slot; beyond that requests get 429."""
    retry_after_s: int = 1
    request_timeout_s: float = 300.0
    """Deadline of one request from its admission (queue time included): past it the run
    is cancelled, its slot freed, and the client gets 504 (an error event in a stream)."""
    body_timeout_s: float = 30.0
    """Time a client has to send its whole request body (408 after)."""


class RunLimiter:
    """Admission (running + queued <= max_runs + max_queue) and the run slots themselves."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.admitted = 0
        self._slots = asyncio.Semaphore(limits.max_runs)

    def try_admit(self, n: int) -> bool:
        if self.admitted + n > self.limits.max_runs + self.limits.max_queue:
            return False
        self.admitted += n
        return True

    def release(self, n: int) -> None:
        self.admitted -= n

    def slot(self) -> asyncio.Semaphore:
        return self._slots


def local_run_bound(models: dict[str, Any]) -> tuple[int, str] | None:
    """How many MoA runs the embedded local server's slots can serve at once, with why;
    None when no served MoA runs on it. A run's widest step is its proposers of one layer
    in parallel, so runs = slots // local proposers (at least 1): admitting more only
    makes calls wait inside for a slot until they time out."""
    from langchain_moa.local import slots_at

    bound: tuple[int, str] | None = None
    for moa in models.values():
        proposers = list(getattr(moa, "proposers", None) or [])
        aggregator = getattr(moa, "aggregator", None)
        for role_models in (proposers, [aggregator]):
            by_server: dict[str, int] = {}
            for model in role_models:
                url = str(getattr(model, "openai_api_base", None) or "")
                if slots_at(url) is not None:
                    by_server[url] = by_server.get(url, 0) + 1
            for url, calls_at_once in by_server.items():
                slots = slots_at(url) or 1
                runs = max(1, slots // calls_at_once)
                if bound is None or runs < bound[0]:
                    bound = (runs, f"{slots} local slots / {calls_at_once} local calls per run")
    return bound


# --------------------------------------------------------------------- errors


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    kinds = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        405: ("invalid_request_error", "method_not_allowed"),
        408: ("invalid_request_error", "request_timeout"),
        413: ("invalid_request_error", "request_too_large"),
        429: ("rate_limit_error", "server_busy"),
        502: ("upstream_error", "upstream_failed"),
        504: ("timeout_error", "request_timeout"),
    }
    kind, code = kinds.get(status, ("server_error", None))
    return {"error": {"message": one_line(message, 1000, whole=True), "type": kind,
                      "param": param, "code": code}}  # fmt: skip


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def _field(loc: tuple | list) -> str:
    """A pydantic location as a field path: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def check_json(value: Any, path: str = "", depth: int = 0) -> None:
    """Refuse what JSON parsers let through but nothing downstream should see: nesting
    deeper than 64, NaN and infinities, strings with lone surrogates (not UTF-8)."""
    if depth > _MAX_JSON_DEPTH:
        raise RequestError(400, f"the body nests deeper than {_MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(400, f"{path or 'the body'} must be a finite number, got {value}",
                           path or None)  # fmt: skip
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = path or "the body"
            raise RequestError(400, f"{where} holds a lone surrogate (\\ud800-\\udfff): not "
                               "valid UTF-8 text", path or None) from None  # fmt: skip
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json(key, path, depth + 1)
            check_json(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json(item, f"{path}[{i}]", depth + 1)


PARSED_BODY = "moa_parsed_body"
"""Where `Guard` leaves a POST body it parsed (``scope["state"]``), so handlers do not
parse and check it again."""


def parse_json(raw: bytes) -> Any:
    """The body as JSON, checked by `check_json`; RequestError(400) when it is not."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise RequestError(400, f"the body nests deeper than {_MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    check_json(value)
    return value


def upstream_status(exc: BaseException) -> tuple[int, str]:
    """A run's failure as (status, one-line message naming the failing model); upstream
    failures are also logged, one redacted line each, for whoever runs the server."""
    if isinstance(exc, ValueError) and not isinstance(exc, calls.CallError):
        return 400, str(exc)
    if isinstance(exc, (calls.CallError, MoAError)):
        status, text = 502, str(exc)
    else:
        status, text = 500, f"{type(exc).__name__}: {exc}"
    log.warning("MoA run failed (HTTP %d): %s", status, one_line(text, 1000, whole=True))
    return status, text


# ------------------------------------------------------------ request parsing


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class MoAOptions(_Open):
    drafts: StrictBool | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None


class FunctionSpec(_Open):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaFormat(_Open):
    name: StrictStr
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Open):
    """The fields of a chat completions body the server reads, typed and bounded as
    OpenAI documents them; other fields are allowed (and ignored)."""

    model: Annotated[StrictStr, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    moa: MoAOptions | None = None


def _why(error: dict[str, Any]) -> str:
    """One pydantic error as a phrase: what was expected, what came."""
    given = error.get("input")
    shown = json.dumps(given)[:60] if isinstance(given, (int, float, str, bool)) else (
        "null" if given is None else type(given).__name__.replace("dict", "object")
        .replace("list", "array"))  # fmt: skip
    why = re.sub(r"a valid dictionary or instance of \w+", "a JSON object", error["msg"])
    why = why.replace("a valid dictionary", "a JSON object").replace("a valid list", "an array")
    return f"{why[0].lower()}{why[1:]} (got {shown})"


def validate_request(body: Any) -> ChatCompletionRequest:
    """The body as a `ChatCompletionRequest`, or RequestError(400) naming the first bad
    field (``param``) and what it must be."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if body.get("messages") == []:
        raise RequestError(400, "'messages' must be a non-empty list of messages", "messages")
    try:
        return ChatCompletionRequest.model_validate(body)
    except PydanticValidationError as exc:
        # a union reports one error per branch: name the field once, with its first reason
        first = exc.errors(include_url=False)[0]
        param = _field(_trim_loc(first["loc"], body))
        if first["type"] == "missing":
            raise RequestError(400, f"'{param}' is required", param) from None
        raise RequestError(400, f"'{param}' is not valid: {_why(first)}", param) from None


def _trim_loc(loc: tuple, body: Any) -> list[Any]:
    """The part of a pydantic location that names fields of the body (drops the union
    branch names pydantic inserts, like ``str`` or ``list[str]``)."""
    path, value = [], body
    for part in loc:
        if isinstance(value, dict) and part in value:
            path.append(part)
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            path.append(part)
            value = value[part]
        elif isinstance(part, str) and not path:
            path.append(part)  # a missing top-level field
            value = None
        elif isinstance(value, dict) and isinstance(part, str) and part.isidentifier():
            path.append(part)  # a missing nested field
            value = None
    return path


_IGNORED_NULLS = ("audio", "refusal", "function_call", "annotations", "tool_calls", "name")


def _history_message(message: Message) -> dict[str, Any]:
    """A message as `convert_to_messages` takes it; the empty fields of a response's
    ``model_dump()`` (``audio``, ``refusal``, ``annotations``...) dropped."""
    data = message.model_dump(exclude_none=True)
    for key in _IGNORED_NULLS:
        if key in data and not data[key]:
            del data[key]
    data.setdefault("content", "")
    return data


def parse_request(body: Any, models: dict[str, Any]) -> tuple[Any, list[BaseMessage], dict]:
    """(the MoA, the conversation, call options) from a chat completions body."""
    request = validate_request(body)
    name = request.model
    if name not in models:
        raise RequestError(
            404, f"model {name!r} is not served here; served: {', '.join(models)}", "model"
        )
    try:
        conversation = convert_to_messages([_history_message(m) for m in request.messages])
    except Exception as exc:
        raise RequestError(400, f"'messages' is not valid: {one_line(str(exc), 300)}",
                           "messages") from None  # fmt: skip
    if request.n not in (None, 1):
        raise RequestError(400, "only n = 1 is supported", "n")
    options = {k: body[k] for k in _CALL_OPTIONS if body.get(k) is not None}
    if request.max_completion_tokens is not None:
        if request.max_tokens not in (None, request.max_completion_tokens):
            raise RequestError(400, "'max_tokens' and 'max_completion_tokens' disagree; send "
                                    "one of them (max_completion_tokens is OpenAI's current "
                                    "name)", "max_tokens")  # fmt: skip
        options["max_tokens"] = request.max_completion_tokens
    if "response_format" in options:
        options.update(_response_format_options(models[name], options.pop("response_format")))
    return models[name], conversation, options


def _response_format_options(moa: Any, response_format: dict[str, Any]) -> dict[str, Any]:
    """``response_format`` for the aggregator. `ChatOpenAI` answers a request that carries
    it through the SDK's ``parse``, which raises ``LengthFinishReasonError`` for an answer
    cut off at the token limit: it goes in ``extra_body`` instead, so the cut-off answer
    comes back with ``finish_reason: "length"`` as OpenAI's API returns it."""
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:  # pragma: no cover - langchain-openai is a dependency
        return {"response_format": response_format}
    aggregator = getattr(moa, "aggregator", None)
    if isinstance(aggregator, ChatOpenAI):
        extra = dict(aggregator.extra_body or {})
        return {"extra_body": {**extra, "response_format": response_format}}
    return {"response_format": response_format}


def _usage(message: Any) -> dict[str, Any]:
    usage = getattr(message, "usage_metadata", None) or {}
    body: dict[str, Any] = {
        "prompt_tokens": int(usage.get("input_tokens", 0)),
        "completion_tokens": int(usage.get("output_tokens", 0)),
        "total_tokens": int(usage.get("total_tokens", 0)),
    }
    cached = (usage.get("input_token_details") or {}).get("cache_read")
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": int(cached)}
    reasoning = (usage.get("output_token_details") or {}).get("reasoning")
    if reasoning:
        body["completion_tokens_details"] = {"reasoning_tokens": int(reasoning)}
    return body


def _finish_reason(message: Any) -> str:
    if getattr(message, "tool_calls", None):
        return "tool_calls"
    return str(message.response_metadata.get("finish_reason") or "stop")


def completion_body(message: AIMessage, model: str, drafts: bool) -> dict[str, Any]:
    """A ``chat.completion`` object for the aggregator's final message."""
    choice = convert_to_openai_messages(message)
    if not choice.get("content") and choice.get("tool_calls"):
        choice["content"] = None  # OpenAI's tool-call message has no text: null, not ""
    choice.setdefault("content", None)
    body: dict[str, Any] = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": choice, "finish_reason": _finish_reason(message)}],
        "usage": _usage(message),
    }
    if drafts:
        body["moa"] = message.response_metadata.get("moa")
    return body


def draft_event(result: CallResult) -> dict[str, Any] | None:
    """A proposer's finished call as a ``moa.draft`` event (None for other calls).

    It has ``"choices": []`` so a client's ``for c in chunk.choices`` loop skips it, and
    its failure is ``"failure"``: the ``openai`` SDK raises on any event with an
    ``"error"`` field, which would end the client's stream at a failed draft."""
    proposal = proposal_of(result)
    if proposal is None:
        return None
    message = result.message
    finish = message.response_metadata.get("finish_reason") if message is not None else None
    return {
        "object": "moa.draft",
        "choices": [],
        "layer": proposal.layer,
        "proposer": proposal.proposer + 1,  # 1-based, as people count
        "model": proposal.model,
        "latency_s": round(proposal.latency_s, 3),
        "tokens": (proposal.usage or {}).get("output_tokens"),
        "answer": proposal.answer,
        "failure": proposal.error,
        "dropped": proposal.dropped,
        "finish_reason": finish,  # "length": cut at its token cap; None when it failed
    }


def served_shape(moa: Any) -> dict[str, Any] | None:
    """A served MoA's shape for ``/v1/models``: the inspector draws a placeholder per
    proposer and layer before the first draft arrives (None for a runnable that is no
    `ChatMoA`)."""
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.models import model_label

    if not isinstance(moa, ChatMoA):
        return None
    return {"layers": moa.layers, "proposers": [model_label(p) for p in moa.proposers],
            "aggregator": model_label(moa.aggregator)}  # fmt: skip


# --------------------------------------------------------------------- handlers


class ChatCompletions:
    """``/v1/models`` and ``/v1/chat/completions`` over the served MoAs."""

    def __init__(self, models: dict[str, Any], limiter: RunLimiter) -> None:
        self.models = models
        self.limiter = limiter

    def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [self._card(name, moa) for name, moa in self.models.items()],
        }

    @staticmethod
    def _card(name: str, moa: Any) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "langchain-moa"}
        shape = served_shape(moa)
        return {**card, "moa": shape} if shape else card

    def model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.models:
            raise RequestError(404, f"model {model_id!r} is not served here; served: "
                                    f"{', '.join(self.models)}", "model")  # fmt: skip
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "langchain-moa"}

    async def complete(self, body: Any) -> dict[str, Any]:
        moa, conversation, options = parse_request(body, self.models)
        drafts = bool((body.get("moa") or {}).get("drafts"))
        async with self.limiter.slot():
            try:
                message = await moa.ainvoke(conversation, **options)
            except (calls.CallError, MoAError, ValueError) as exc:
                status, text = upstream_status(exc)
                raise RequestError(status, text) from None
        return completion_body(message, body["model"], drafts)

    async def stream(self, body: Any) -> AsyncIterator[str]:
        """SSE lines: draft events (if asked), content chunks, usage, ``[DONE]``."""
        moa, conversation, options = parse_request(body, self.models)
        drafts = bool((body.get("moa") or {}).get("drafts"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._stream(moa, conversation, options, body["model"], drafts, include_usage)

    async def _stream(
        self, moa: Any, conversation: list[BaseMessage], options: dict, model: str,
        drafts: bool, include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        ident, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        events: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                         "model": model, "choices": [choice], **extra})  # fmt: skip

        def observe(result: CallResult) -> None:
            event = draft_event(result) if drafts else None
            if event is not None:
                events.put_nowait(_sse({"id": ident, "created": created, "model": model,
                                        **event}))  # fmt: skip

        async def produce() -> None:
            final: AIMessageChunk | None = None
            try:
                async with self.limiter.slot():
                    with calls.observe(observe):
                        async for piece in moa.astream(conversation, **options):
                            final = piece if final is None else final + piece
                            delta: dict[str, Any] = {}
                            if piece.content:
                                delta["content"] = piece.text
                            if piece.tool_call_chunks:
                                delta["tool_calls"] = [
                                    {"index": c.get("index") or 0, "id": c.get("id"),
                                     "type": "function",
                                     "function": {"name": c.get("name"),
                                                  "arguments": c.get("args") or ""}}
                                    for c in piece.tool_call_chunks
                                ]  # fmt: skip
                            if delta:
                                events.put_nowait(chunk(delta))
                if final is None:
                    final = AIMessageChunk(content="")
                extra = {"moa": final.response_metadata.get("moa")} if drafts else {}
                events.put_nowait(chunk({}, _finish_reason(final), **extra))
                if include_usage:
                    events.put_nowait(_sse({"id": ident, "object": "chat.completion.chunk",
                                            "created": created, "model": model, "choices": [],
                                            "usage": _usage(final)}))  # fmt: skip
            except (calls.CallError, MoAError, ValueError) as exc:
                status, text = upstream_status(exc)
                events.put_nowait(_sse(error_body(status, text)))
            except Exception as exc:  # never a stream that ends as if it had answered
                log_unexpected(exc, "POST /v1/chat/completions (stream)")
                events.put_nowait(_sse(error_body(500, "internal error; see the server log")))
            finally:
                events.put_nowait(done)

        yield chunk({"role": "assistant", "content": ""})
        task = asyncio.create_task(produce())
        try:
            while (item := await events.get()) is not done:
                yield item
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()  # the client left: no upstream call after this


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def log_unexpected(exc: BaseException, where: str) -> None:
    """One redacted log line for an error nobody planned for (no traceback: run with
    ``--debug`` to see it)."""
    log.error("unexpected error in %s: %s", where,
              one_line(f"{type(exc).__name__}: {exc}", 1000, whole=True))  # fmt: skip
    log.debug("traceback", exc_info=exc)


class Reported(Exception):
    """A failure already logged (one line) and answered; the Guard stays quiet about it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reported(exc: BaseException) -> bool:
    group = getattr(exc, "exceptions", None)  # an exception group (anyio task groups)
    if isinstance(group, (list, tuple)) and group:
        return all(_reported(e) for e in group)
    return isinstance(exc, Reported)


class PerItemBatch(RunnableBinding):
    """The LangServe face of a served MoA: each run takes a server slot, and a batch
    fails item by item (a failed item is an empty AI message whose
    ``response_metadata["moa_error"]`` says why) instead of failing every answer."""

    limiter: Any = None

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kw: Any) -> Any:
        async with self.limiter.slot():
            try:
                return await self.bound.ainvoke(input, config, **kw)
            except (calls.CallError, MoAError, ValueError) as exc:
                # an HTTP answer with one line, not LangServe's 500 and a logged traceback
                from fastapi import HTTPException

                status, text = upstream_status(exc)
                raise HTTPException(status, one_line(text, 1000, whole=True)) from None

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kw: Any
    ) -> AsyncIterator[Any]:
        async with self.limiter.slot():
            try:
                async for chunk in self.bound.astream(input, config, **kw):
                    yield chunk
            except (calls.CallError, MoAError, ValueError) as exc:
                # LangServe ends the stream with its error event; the log gets one line
                status, text = upstream_status(exc)
                raise Reported(status, text) from None

    async def abatch(
        self, inputs: list[Any], config: Any = None, *, return_exceptions: bool = False,
        **kw: Any,
    ) -> list[Any]:  # fmt: skip
        configs = config if isinstance(config, list) else [config] * len(inputs)

        async def one(item: Any, cfg: Any) -> Any:
            from fastapi import HTTPException

            try:
                return await self.ainvoke(item, cfg, **kw)
            except HTTPException as exc:
                return AIMessage(content="", response_metadata={
                    "moa_error": {"status": exc.status_code, "message": exc.detail}})  # fmt: skip

        return list(
            await asyncio.gather(*(one(x, c) for x, c in zip(inputs, configs, strict=True)))
        )


# ------------------------------------------------------------------- middleware


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def check_chat_input(value: Any, param: str, schema: Any = None) -> None:
    """A LangServe input as the served runnable's input schema takes it (a string, a list
    of messages like ``{"type": "human", "content": "..."}``, a serialized prompt value);
    RequestError(400) naming `param` otherwise, where LangServe would answer 500 (its
    message validation raises TypeError for a message without a ``type``)."""
    if value == []:
        raise RequestError(400, f"'{param}' is an empty conversation", param)
    if schema is None:
        return
    try:
        schema.model_validate(value)
    except Exception:
        raise RequestError(400, f"'{param}' must be a string or a list of messages like "
                                '{"type": "human", "content": "..."}', param) from None  # fmt: skip


def runs_of(method: str, path: str, data: Any, max_batch: int, schema: Any = None) -> int:
    """The MoA runs a request asks for: every POST is one (the app serves no POST that is
    not a run), a batch of n inputs is n. `data` is the body as `parse_json` read it (None
    for an empty body). RequestError for a LangServe body that is malformed, or a batch
    over `max_batch`."""
    if method != "POST":
        return 0
    if not path.startswith("/moa/"):
        return 1
    if data is None:
        data = {}
    if not path.rstrip("/").endswith("/batch"):
        if isinstance(data, dict) and "input" in data:
            check_chat_input(data["input"], "input", schema)
        return 1  # (LangServe names a missing 'input' itself)
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, list):
        raise RequestError(400, "a batch body is {\"inputs\": [input, ...]}: 'inputs' must be "
                                "a list", "inputs")  # fmt: skip
    if len(inputs) > max_batch:
        raise RequestError(413, f"a batch of {len(inputs)} inputs is over the limit of "
                                f"{max_batch}; split it")  # fmt: skip
    for i, item in enumerate(inputs):
        check_chat_input(item, f"inputs[{i}]", schema)
    return max(1, len(inputs))


class _Response:
    """What an app has sent so far (so a late error knows what it may still send)."""

    def __init__(self, send: Callable) -> None:
        self._send = send
        self.started = self.finished = False
        self.content_type = ""
        self.status = 0

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message.get("status", 0))
            headers = dict(message.get("headers") or [])
            self.content_type = headers.get(b"content-type", b"").decode("latin-1")
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.finished = True
        await self._send(message)


class Guard:
    """Auth, body and batch limits, JSON checks, admission, the request deadline,
    cancel-on-disconnect and OpenAI-format errors, for every route."""

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, limiter: RunLimiter, input_schema: Any = None
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.limiter = limiter
        self.input_schema = input_schema
        """The LangServe runnable's input schema (its inputs are checked against it)."""

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response(send)
        started = time.perf_counter()
        try:
            await self._guarded(scope, receive, response)
        except Exception as exc:  # the one place nothing gets past: one line, OpenAI JSON
            if not _reported(exc):
                log_unexpected(exc, f"{scope.get('method')} {scope.get('path')}")
            if not response.started:
                await _reply(response.send, 500, error_body(500, "internal error; see the "
                                                                 "server log"))  # fmt: skip
            elif not response.finished:
                await response.send({"type": "http.response.body", "body": b""})
        finally:
            # The path only: a query string may hold a key (?api_key=...), and the record
            # goes through the log redaction besides. 0 = the client left before an answer.
            access_log.info(
                "%s %s %d %.1f ms", scope.get("method"), scope.get("path"), response.status,
                (time.perf_counter() - started) * 1000,
            )  # fmt: skip

    async def _guarded(self, scope: dict, receive: Callable, response: _Response) -> None:
        send = response.send
        limits = self.limiter.limits
        if scope["path"] == HEALTH_PATH and scope["method"] == "GET":
            # For load balancers and probes: no key, no model call, not a run.
            await _reply(send, 200, {"status": "ok"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers):
            await _reply(send, 401, error_body(401, "missing or wrong API key: send "
                                                    "'Authorization: Bearer <MOA_SERVE_API_KEY>'"),
                         [(b"www-authenticate", b'Basic realm="moa"')])  # fmt: skip
            return
        limit = limits.max_body_bytes
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await _reply(send, 413, error_body(413, f"request body over {limit} bytes"))
            return
        try:
            body = await asyncio.wait_for(_read_body(receive, limit), limits.body_timeout_s)
        except asyncio.TimeoutError:
            await _reply(send, 408, error_body(408, f"the request body did not arrive within "
                                                    f"{limits.body_timeout_s:g} s"),
                         [(b"connection", b"close")])  # fmt: skip
            return
        except RequestError as exc:
            await _reply(send, exc.status, error_body(exc.status, str(exc), exc.param))
            return
        if body is None:
            return  # the client left
        path, method = scope["path"], scope["method"]
        try:
            # every route: no NaN, lone surrogate or 1000-deep nesting; read once, here
            data = parse_json(body) if method == "POST" and body.strip() else None
            if data is not None:
                scope.setdefault("state", {})[PARSED_BODY] = data
            runs = runs_of(method, path, data, limits.max_batch, self.input_schema)
        except RequestError as exc:
            refusal = error_body(exc.status, str(exc), exc.param)
            if path.startswith("/moa/"):
                refusal["detail"] = refusal["error"]["message"]  # where LangServe clients look
            await _reply(send, exc.status, refusal)
            return
        if runs and not self.limiter.try_admit(runs):
            retry = str(limits.retry_after_s).encode()
            await _reply(send, 429, error_body(429, "the server is busy: too many MoA runs "
                                                    "in flight; retry later"),
                         [(b"retry-after", retry)])  # fmt: skip
            return
        try:
            await asyncio.wait_for(self._run_until_disconnect(scope, body, receive, send),
                                   limits.request_timeout_s if runs else None)  # fmt: skip
        except asyncio.TimeoutError:
            await self._timed_out(path, response)
        finally:
            self.limiter.release(runs)

    async def _timed_out(self, path: str, response: _Response) -> None:
        """The deadline passed (the run is cancelled by now): say so in the route's terms."""
        seconds = self.limiter.limits.request_timeout_s
        message = (f"no answer within the server's request timeout ({seconds:g} s); the run "
                   "was stopped")  # fmt: skip
        log.warning("request to %s stopped at its deadline (%g s)", path, seconds)
        if not response.started:
            await _reply(response.send, 504, error_body(504, message))
            return
        if response.finished:
            return
        if "text/event-stream" in response.content_type:
            if path.startswith("/moa/"):  # LangServe's error and end events
                data = json.dumps({"status_code": 504, "message": message})
                tail = f"event: error\r\ndata: {data}\r\n\r\nevent: end\r\n\r\n"
            else:
                tail = _sse(error_body(504, message)) + "data: [DONE]\n\n"
            await response.send({"type": "http.response.body", "body": tail.encode()})
        else:
            await response.send({"type": "http.response.body", "body": b""})

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "basic":  # a browser's prompt: any user name, the key as password
            try:
                value = base64.b64decode(value).decode("utf-8").partition(":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        assert self.api_key is not None
        return hmac.compare_digest(value.encode(), self.api_key.encode())

    async def _run_until_disconnect(
        self, scope: dict, body: bytes, receive: Callable, send: Callable
    ) -> None:
        """Run the app; if the client hangs up first, cancel it (and every call it awaits)."""
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        app_task = asyncio.current_task()

        async def listen() -> None:
            message = await receive()
            while message["type"] != "http.disconnect":
                message = await receive()
            inbox.put_nowait(message)
            if app_task is not None:
                app_task.cancel()

        listener = asyncio.create_task(listen())
        try:
            await self.app(scope, inbox.get, send)
        except asyncio.CancelledError:
            if listener.done() and not listener.cancelled():
                return  # the client left; nobody to answer
            raise
        finally:
            listener.cancel()


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body (None if the client left first); RequestError(413) past
    `limit` bytes."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        if not message.get("more_body"):
            return body


async def _reply(send: Callable, status: int, body: Any, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": [*fields, *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


# -------------------------------------------------------------------------- app


def create_app(
    models: dict[str, Any],
    *,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
) -> Any:
    """The ASGI app `moa serve` runs: OpenAI's chat completions, LangServe routes, health.

    Args:
        models: model id (what clients send as ``model``) -> `ChatMoA`.
        api_key: when set, every route but ``/health`` needs it as a Bearer token.
        limits: runs at once, queue, body size, timeouts (`ServeLimits`; default: its
            defaults).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if not models:
        raise ValueError("create_app needs at least one MoA to serve")
    limiter = RunLimiter(limits or ServeLimits())
    api = ChatCompletions(models, limiter)
    app = FastAPI(title="langchain-moa", description="Mixture-of-Agents as virtual models")

    def error(request: Request, status: int, message: str, param: str | None = None,
              headers: dict | None = None) -> JSONResponse:  # fmt: skip
        body = error_body(status, message, param)
        if status == 404 and param is None:
            body["error"]["code"] = "not_found"
        if request.url.path.startswith("/moa/"):
            body["detail"] = body["error"]["message"]  # where LangServe clients look
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return error(request, exc.status, str(exc), exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path} here; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error(request, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{"loc": (), "msg": "invalid request"}])[0]
        loc = [p for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = _field(loc) or None
        return error(request, 400, f"'{param or 'body'}' is not valid: {first.get('msg')}", param)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers with this, then re-raises to the Guard, which logs one line
        return error(request, 500, "internal error; see the server log")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return api.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return api.model(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = request.scope.get("state", {}).get(PARSED_BODY)  # the guard read it
        if body is None:
            body = parse_json(await request.body())
        if isinstance(body, dict) and body.get("stream") is True:
            lines = await api.stream(body)
            return StreamingResponse(lines, media_type="text/event-stream")
        return await api.complete(body)

    @app.get("/", response_class=HTMLResponse)
    async def inspector() -> str:
        return INSPECTOR_HTML.read_text(encoding="utf-8")

    schema = None
    try:
        from langserve import add_routes
    except ImportError:  # the OpenAI API needs only FastAPI
        pass
    else:
        runnable = PerItemBatch(bound=next(iter(models.values())), limiter=limiter)
        add_routes(app, runnable, path="/moa", enabled_endpoints=list(LANGSERVE_ENDPOINTS))
        schema = runnable.get_input_schema()
    app.state.limiter = limiter
    return Guard(app, api_key=api_key, limiter=limiter, input_schema=schema)

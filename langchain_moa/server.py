"""`moa serve`: MoAs as virtual models behind an OpenAI-compatible API, LangServe and an
inspector page, on one server that protects itself.

Routes (see docs/serving.md):

- ``GET /v1/models``, ``POST /v1/chat/completions``: every served MoA is a model whose id
  is its recipe or config name. The aggregator is the model that answers: ``tools``,
  ``tool_choice``, ``response_format``, ``temperature``, ``max_tokens`` and ``stop`` go to
  it; usage sums every call. Extension: ``"moa": {"drafts": true}`` in the request adds
  the drafts of every layer (``"moa"`` in the response; ``moa.draft`` events, as they
  arrive, in a stream). Errors are OpenAI's error JSON.
- ``/moa/...``: LangServe (invoke, batch, stream, playground) for the first served MoA.
- ``/``: the inspector, a chat page showing every layer's drafts as they arrive.

Protection, in one ASGI middleware in front of every route: a bearer key when
``MOA_SERVE_API_KEY`` is set (browsers may send it as the Basic password), a body-size
limit, a batch-size limit, a server-wide bound on MoA runs with a bounded queue (429 with
``Retry-After`` beyond it), and cancellation of a request's work the moment its client
hangs up, streaming or not.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and
# `Request` is imported inside `create_app` (FastAPI is an optional extra).
import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.runnables import RunnableBinding, RunnableConfig

from langchain_moa import calls
from langchain_moa.calls import CallResult
from langchain_moa.engine import proposal_of
from langchain_moa.errors import MoAError
from langchain_moa.redaction import one_line

API_KEY_ENV = "MOA_SERVE_API_KEY"
log = logging.getLogger(__name__)
INSPECTOR_HTML = Path(__file__).with_name("inspector.html")

# Routes that start MoA runs (admission control counts them).
_RUN_PATHS = ("/v1/chat/completions", "/moa/invoke", "/moa/batch", "/moa/stream")
_CALL_OPTIONS = ("tools", "tool_choice", "response_format", "temperature", "max_tokens", "stop",
                 "parallel_tool_calls", "seed", "top_p")  # fmt: skip


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


# --------------------------------------------------------------------- errors


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    kinds = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "model_not_found"),
        413: ("invalid_request_error", "request_too_large"),
        429: ("rate_limit_error", "server_busy"),
        502: ("upstream_error", "upstream_failed"),
    }
    kind, code = kinds.get(status, ("server_error", None))
    return {"error": {"message": one_line(message, 1000, whole=True), "type": kind,
                      "param": param, "code": code}}  # fmt: skip


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


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


def parse_request(body: Any, models: dict[str, Any]) -> tuple[Any, list[BaseMessage], dict]:
    """(the MoA, the conversation, call options) from a chat completions body."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise RequestError(400, "'model' is required: one of " + ", ".join(models), "model")
    if name not in models:
        raise RequestError(
            404, f"model {name!r} is not served here; served: {', '.join(models)}", "model"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of messages", "messages")
    try:
        conversation = convert_to_messages(messages)
    except Exception as exc:
        raise RequestError(400, f"'messages' is not valid: {exc}", "messages") from None
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n = 1 is supported", "n")
    options = {k: body[k] for k in _CALL_OPTIONS if body.get(k) is not None}
    return models[name], conversation, options


def _usage(message: Any) -> dict[str, int]:
    usage = getattr(message, "usage_metadata", None) or {}
    return {
        "prompt_tokens": int(usage.get("input_tokens", 0)),
        "completion_tokens": int(usage.get("output_tokens", 0)),
        "total_tokens": int(usage.get("total_tokens", 0)),
    }


def _finish_reason(message: Any) -> str:
    if getattr(message, "tool_calls", None):
        return "tool_calls"
    return str(message.response_metadata.get("finish_reason") or "stop")


def completion_body(message: AIMessage, model: str, drafts: bool) -> dict[str, Any]:
    """A ``chat.completion`` object for the aggregator's final message."""
    choice = convert_to_openai_messages(message)
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
    """A proposer's finished call as a ``moa.draft`` event (None for other calls)."""
    proposal = proposal_of(result)
    if proposal is None:
        return None
    return {
        "object": "moa.draft",
        "layer": proposal.layer,
        "proposer": proposal.proposer + 1,  # 1-based, as people count
        "model": proposal.model,
        "latency_s": round(proposal.latency_s, 3),
        "tokens": (proposal.usage or {}).get("output_tokens"),
        "answer": proposal.answer,
        "error": proposal.error,
        "dropped": proposal.dropped,
    }


# --------------------------------------------------------------------- handlers


class ChatCompletions:
    """``/v1/models`` and ``/v1/chat/completions`` over the served MoAs."""

    def __init__(self, models: dict[str, Any], limiter: RunLimiter) -> None:
        self.models = models
        self.limiter = limiter

    def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "langchain-moa"}
                for name in self.models
            ],
        }

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
                events.put_nowait(_sse(event))

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
            async for chunk in self.bound.astream(input, config, **kw):
                yield chunk

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


class Guard:
    """Auth, body and batch limits, admission, and cancel-on-disconnect for every route."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, limiter: RunLimiter) -> None:
        self.app = app
        self.api_key = api_key
        self.limiter = limiter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers):
            await _reply(send, 401, error_body(401, "missing or wrong API key: send "
                                                    "'Authorization: Bearer <MOA_SERVE_API_KEY>'"),
                         [(b"www-authenticate", b'Basic realm="moa"')])  # fmt: skip
            return
        limit = self.limiter.limits.max_body_bytes
        if int(headers.get("content-length") or 0) > limit:
            await _reply(send, 413, error_body(413, f"request body over {limit} bytes"))
            return
        body, disconnected = b"", False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            body += message.get("body", b"")
            if len(body) > limit:
                await _reply(send, 413, error_body(413, f"request body over {limit} bytes"))
                return
            if not message.get("more_body"):
                break
        if disconnected:
            return
        path = scope["path"]
        runs = 0
        if scope["method"] == "POST" and path in _RUN_PATHS:
            runs = 1
            if path == "/moa/batch":
                try:
                    runs = max(1, len(json.loads(body or b"{}").get("inputs") or []))
                except (ValueError, AttributeError):
                    runs = 1  # LangServe reports the malformed body itself
                if runs > self.limiter.limits.max_batch:
                    await _reply(send, 413, error_body(413, (
                        f"a batch of {runs} inputs is over the limit of "
                        f"{self.limiter.limits.max_batch}; split it")))  # fmt: skip
                    return
            if not self.limiter.try_admit(runs):
                retry = str(self.limiter.limits.retry_after_s).encode()
                await _reply(send, 429, error_body(429, "the server is busy: too many MoA runs "
                                                        "in flight; retry later"),
                             [(b"retry-after", retry)])  # fmt: skip
                return
        try:
            await self._run_until_disconnect(scope, body, receive, send)
        finally:
            self.limiter.release(runs)

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
    """The ASGI app `moa serve` runs: `models` maps model ids to ChatMoA instances."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    if not models:
        raise ValueError("create_app needs at least one MoA to serve")
    limiter = RunLimiter(limits or ServeLimits())
    api = ChatCompletions(models, limiter)
    app = FastAPI(title="langchain-moa", description="Mixture-of-Agents as virtual models")

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, str(exc), exc.param), status_code=exc.status)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return api.list_models()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise RequestError(400, "the body is not valid JSON") from None
        if isinstance(body, dict) and body.get("stream"):
            lines = await api.stream(body)
            return StreamingResponse(lines, media_type="text/event-stream")
        return await api.complete(body)

    @app.get("/", response_class=HTMLResponse)
    async def inspector() -> str:
        return INSPECTOR_HTML.read_text(encoding="utf-8")

    try:
        from langserve import add_routes
    except ImportError:  # the OpenAI API needs only FastAPI
        pass
    else:
        first = next(iter(models.values()))
        add_routes(app, PerItemBatch(bound=first, limiter=limiter), path="/moa")
    app.state.limiter = limiter
    return Guard(app, api_key=api_key, limiter=limiter)

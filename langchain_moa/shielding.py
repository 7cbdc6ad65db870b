"""What others see of a model call: redacted errors, masked answers, shielded callbacks.

The call layer (`calls`) runs every model call; this module holds what it hands to anyone
else: `call_error` turns a provider's exception into the one-line, redacted `CallError`;
`mask_message` and `StreamMask` mask known secret values in answers and streamed chunks
(a tail held back while it could be the start of a key split across chunks);
`shield_callbacks` wraps a child run's callback handlers (tracers, ``astream_events``,
LangGraph's streams) so that they receive only those, and ``serialized`` payloads without
header or base-URL credentials; `_child_scope` is the context a child run starts in.
A ``call`` here is the `calls.ModelCall` being run (or None).
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp
from pydantic import BaseModel

from langchain_moa._compat import configure_hooks, var_child_runnable_config
from langchain_moa.errors import (
    CallError,
    is_connection_error,
    is_model_rejected,
    is_transient_error,
    status_code,
)
from langchain_moa.models import model_endpoint
from langchain_moa.redaction import (
    answer_secrets,
    mask_urls,
    mask_values,
    one_line,
    redact,
)

# ------------------------------------------------------------------------ errors


def call_error(exc: BaseException, role: str, model: str, *, client: Any = None) -> CallError:
    """The one-line, redacted `CallError` for a provider's exception.

    `client` is the chat model that was called: when the server could not be reached,
    the reason names its origin (``(could not reach http://127.0.0.1:9)``; never the
    userinfo, path or query), which the provider's "Connection error." leaves out. The
    exception is classified by type here (`langchain_moa.errors`), once: the `CallError`
    keeps the answers, not the exception.
    """
    rejected, unreachable = is_model_rejected(exc), is_connection_error(exc)
    if isinstance(exc, CallError):  # a nested MoA failed: keep its own account
        reason, error_type = str(exc), exc.error_type
        rejected, unreachable = exc.rejected, exc.unreachable
    elif isinstance(exc, IndexError):  # langchain-core indexing an empty generation list
        reason = f"the model returned no answer (empty 'choices'): IndexError: {exc}"
        error_type = "IndexError"
    else:
        text = one_line(str(exc), limit=700, whole=True)  # complete, on one line
        error_type = type(exc).__name__
        reason = f"{error_type}: {text}" if text else error_type
        endpoint = model_endpoint(client) if unreachable else None
        if endpoint:
            reason = f"{reason} (could not reach {endpoint})"
    return CallError(
        one_line(f"{role} ({model}): {reason}", limit=800),
        role=role,
        model=model,
        error_type=error_type,
        status_code=status_code(exc),
        transient=is_transient_error(exc),
        rejected=rejected,
        unreachable=unreachable,
    )


# ------------------------------------------------------------- what others see


def _scrub(value: Any, text: Callable[[str], str], depth: int = 0) -> Any:
    """`value` with `text` applied to every string inside it (dicts, lists, tuples and
    pydantic models such as messages and `LLMResult`); the same object when nothing
    changed, so the common case copies nothing."""
    if isinstance(value, str):
        new = text(value)
        return value if new == value else new
    if depth > 16 or value is None or isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, dict):
        changed = {k: n for k, v in value.items() if (n := _scrub(v, text, depth + 1)) is not v}
        return {**value, **changed} if changed else value
    if isinstance(value, (list, tuple)):
        items = [_scrub(v, text, depth + 1) for v in value]
        if all(n is v for n, v in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else type(value)(items)
    if isinstance(value, BaseModel):
        updates = {
            name: n
            for name in type(value).model_fields
            if (n := _scrub(getattr(value, name, None), text, depth + 1))
            is not getattr(value, name, None)
        }
        return value.model_copy(update=updates) if updates else value
    return value


def mask_message(message: Any, secrets: Sequence[str]) -> Any:
    """A model's answer with every known secret value masked (content, tool calls,
    metadata); `message` itself when there is nothing to mask."""
    if not secrets:
        return message

    def mask(text: str) -> str:
        return mask_values(text, secrets)

    if not isinstance(message, BaseMessage):
        return _scrub(message, mask)
    updates = {
        name: new
        for name in _MESSAGE_FIELDS
        if (value := getattr(message, name, None)) and (new := _scrub(value, mask)) is not value
    }
    return message.model_copy(update=updates) if updates else message


_MESSAGE_FIELDS = (
    "content",
    "tool_calls",
    "invalid_tool_calls",
    "tool_call_chunks",
    "additional_kwargs",
    "response_metadata",
)
"""Where a message's text can be (ids, usage and types hold none)."""


def _held_back(text: str, secrets: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a secret."""
    longest = 0
    for secret in secrets:
        i = text.find(secret[0], max(0, len(text) - len(secret) + 1))
        while i != -1 and len(text) - i > longest:
            if secret.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(secret[0], i + 1)
    return longest


class StreamMask:
    """Masks known secrets in a stream of chunks, even a secret split across chunks.

    Text that could be the beginning of a secret is held back until the next chunk shows
    whether it is one (at most the longest secret's length, and only while the tail
    matches a secret's start: ordinary text passes at once). With no secrets known,
    chunks pass through untouched.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = secrets
        self.pending = ""
        self.id: str | None = None

    def text(self, piece: str, *, last: bool = False) -> str:
        """The part of `self.pending + piece` that can be shown now, masked."""
        text = mask_values(self.pending + piece, self.secrets)
        keep = 0 if last else _held_back(text, self.secrets)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep] if keep else text

    def chunk(self, chunk: Any) -> Any:
        if not self.secrets:
            return chunk
        self.id = chunk.id or self.id
        content = chunk.content
        last = getattr(chunk, "chunk_position", None) == "last"
        if isinstance(content, str):
            shown = self.text(content, last=last)
            if shown != content:
                chunk = chunk.model_copy(update={"content": shown})
        elif self.pending:  # content blocks: release the held text before them
            held, self.pending = self.pending, ""
            chunk = chunk.model_copy(update={"content": [{"type": "text", "text": held}, *content]})
        return mask_message(chunk, self.secrets)

    def flush(self) -> AIMessageChunk | None:
        """The text still held back when the stream ends (it was no secret), as a chunk."""
        if not self.pending:
            return None
        held, self.pending = self.pending, ""
        return AIMessageChunk(content=held, id=self.id)  # the same message as the stream's


class _Scrubber:
    """What one call's callback handlers may receive: redacted errors, masked answers."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.secrets = call.secrets if call is not None else answer_secrets()
        self.streams: dict[Any, StreamMask] = {}

    def error(self, error: BaseException) -> BaseException:
        if isinstance(error, (CallError, GraphBubbleUp, KeyboardInterrupt)):
            return error
        if self.call is None:
            return call_error(error, "model", type(error).__name__)
        return call_error(error, self.call.role, self.call.model_name, client=self.call.model)

    def answer(self, value: Any) -> Any:
        return mask_message(value, self.secrets)

    def settings(self, value: Any) -> Any:
        """A run's serialized model, parameters and inputs: secret values and URL
        passwords masked (the pattern net is not used: inputs are people's text)."""
        return _scrub(value, lambda text: mask_urls(mask_values(text, self.secrets)))

    def failure_data(self, value: Any) -> Any:
        """What a provider's error carried (its response body and headers): redacted."""
        return _scrub(value, redact)

    def token(self, run_id: Any, token: str, chunk: Any) -> tuple[str, Any]:
        if not self.secrets:
            return token, chunk
        mask = self.streams.setdefault(run_id, StreamMask(self.secrets))
        message = getattr(chunk, "message", None)
        if isinstance(message, AIMessageChunk) and isinstance(message.content, str):
            masked = mask.chunk(message)
            return masked.content, chunk.model_copy(
                update={"message": masked, "text": masked.content}
            )
        shown = mask.text(token)
        if isinstance(chunk, GenerationChunk):
            chunk = chunk.model_copy(update={"text": shown})
        return shown, self.answer(chunk)

    def held(self, run_id: Any) -> tuple[str, Any] | None:
        """The text still held back for a run that ends: a last token to send."""
        mask = self.streams.pop(run_id, None)
        rest = mask.flush() if mask is not None else None
        if rest is None:
            return None
        return rest.text, ChatGenerationChunk(message=rest)


def _event(name: str, scrub: Callable[[_Scrubber, tuple, dict], tuple[tuple, dict]]) -> Any:
    """A handler method that cleans its arguments, then calls the wrapped handler's."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        scrubber = _scrubber_of(self)
        args, kwargs = scrub(scrubber, args, kwargs)
        return _target(self, name)(*args, **kwargs)

    async def amethod(self: Any, *args: Any, **kwargs: Any) -> Any:
        scrubber = _scrubber_of(self)
        args, kwargs = scrub(scrubber, args, kwargs)
        result = _target(self, name)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    method.__name__ = amethod.__name__ = name
    return method, amethod


def _scrubber_of(handler: Any) -> _Scrubber:
    scrubber = getattr(handler, "_moa_scrubber", None)
    if scrubber is None:  # a copy langchain-core made of a shielded handler
        scrubber = _Scrubber(None)
    return scrubber


def _target(handler: Any, name: str) -> Any:
    inner = getattr(handler, "_moa_inner", None)
    if inner is not None:
        return getattr(inner, name)
    for cls in type(handler).__mro__:  # past the shield: the handler class's own method
        if cls not in (_SyncShield, _AsyncShield) and name in cls.__dict__:
            return cls.__dict__[name].__get__(handler, type(handler))
    raise AttributeError(name)


def _first_arg(fix: Callable[[_Scrubber, Any], Any]) -> Any:
    def scrub(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            args = (fix(scrubber, args[0]), *args[1:])
        return args, kwargs

    return scrub


def _start(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A run starts: its ``serialized`` model and its parameters are cleaned. Its input
    messages are not walked (a cost on every call): the drafts in them were masked when
    they were answered, and the rest is the caller's own conversation."""
    if args:
        args = (scrubber.settings(args[0]), *args[1:])
    cleaned = {k: scrubber.settings(kwargs[k]) for k in _SETTINGS if k in kwargs}
    return args, {**kwargs, **cleaned} if cleaned else kwargs


_SETTINGS = ("invocation_params", "metadata", "inputs", "options")


def _start_with_inputs(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A chain or tool inside a call (a model built as a chain): its inputs cleaned too."""
    return scrubber.settings(args), scrubber.settings(kwargs)


def _llm_error(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs = _first_arg(_Scrubber.error)(scrubber, args, kwargs)
    if kwargs.get("response") is not None:
        kwargs = {**kwargs, "response": scrubber.failure_data(kwargs["response"])}
    return args, kwargs


def _new_token(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    token = args[0] if args else kwargs.get("token", "")
    shown, chunk = scrubber.token(kwargs.get("run_id"), token, kwargs.get("chunk"))
    kwargs = {k: v for k, v in kwargs.items() if k != "token"}
    if "chunk" in kwargs or chunk is not None:
        kwargs["chunk"] = chunk
    return (shown, *args[1:]), kwargs


def _answer_first(scrubber: _Scrubber, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _first_arg(_Scrubber.answer)(scrubber, args, kwargs)


_EVENTS: dict[str, Callable[[_Scrubber, tuple, dict], tuple[tuple, dict]]] = {
    "on_chat_model_start": _start,
    "on_llm_start": _start,
    "on_chain_start": _start_with_inputs,
    "on_tool_start": _start_with_inputs,
    "on_llm_new_token": _new_token,
    "on_llm_end": _answer_first,
    "on_chain_end": _answer_first,
    "on_tool_end": _answer_first,
    "on_llm_error": _llm_error,
    "on_chain_error": _first_arg(_Scrubber.error),
    "on_tool_error": _first_arg(_Scrubber.error),
    "on_retriever_error": _first_arg(_Scrubber.error),
}


def _flush_then(name: str, sync: bool) -> Any:
    """``on_llm_end``: send the text held back for the run first, as its last token."""
    plain, aplain = _event(name, _answer_first)

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        rest = _scrubber_of(self).held(kwargs.get("run_id"))
        if rest is not None and not getattr(self, "ignore_llm", False):
            _target(self, "on_llm_new_token")(rest[0], chunk=rest[1], **_ids(kwargs))
        return plain(self, *args, **kwargs)

    async def amethod(self: Any, *args: Any, **kwargs: Any) -> Any:
        rest = _scrubber_of(self).held(kwargs.get("run_id"))
        if rest is not None and not getattr(self, "ignore_llm", False):
            result = _target(self, "on_llm_new_token")(rest[0], chunk=rest[1], **_ids(kwargs))
            if inspect.isawaitable(result):
                await result
        return await aplain(self, *args, **kwargs)

    return method if sync else amethod


def _ids(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("run_id", "parent_run_id", "tags") if k in kwargs}


_SyncShield = type(
    "_SyncShield",
    (),
    {
        "__slots__": (),
        **{name: _event(name, scrub)[0] for name, scrub in _EVENTS.items()},
        "on_llm_end": _flush_then("on_llm_end", True),
    },
)
_AsyncShield = type(
    "_AsyncShield",
    (),
    {
        "__slots__": (),
        **{name: _event(name, scrub)[1] for name, scrub in _EVENTS.items()},
        "on_llm_end": _flush_then("on_llm_end", False),
    },
)
_shield_classes: dict[type, type] = {}
_shield_lock = threading.Lock()


def _shield_class(cls: type) -> type:
    """``cls`` with the shield's event methods in front (one class per handler class)."""
    shield = _shield_classes.get(cls)
    if shield is None:
        mixin = _AsyncShield if issubclass(cls, AsyncCallbackHandler) else _SyncShield
        shield = type(
            cls.__name__,
            (mixin, cls),
            {"__slots__": ("_moa_inner", "_moa_scrubber"), "__module__": cls.__module__},
        )
        with _shield_lock:
            shield = _shield_classes.setdefault(cls, shield)
    return shield


def _shielded(handler: BaseCallbackHandler, scrubber: _Scrubber) -> BaseCallbackHandler:
    """`handler` as seen by one call's runs: the same object state (its ``__dict__`` is
    shared, so a tracer's run tree is one), the same class for ``isinstance`` checks
    (LangChain recognises tracers and streaming handlers by class), redacted events."""
    handler = getattr(handler, "_moa_inner", None) or handler
    try:
        shield = object.__new__(_shield_class(type(handler)))
        shield.__dict__ = handler.__dict__
    except (TypeError, AttributeError):  # a handler without a plain __dict__
        shield = _Delegate(handler)
    shield._moa_inner = handler
    shield._moa_scrubber = scrubber
    return shield


class _Delegate(BaseCallbackHandler):
    """The shield for a handler whose state cannot be shared: forwards everything."""

    def __init__(self, inner: BaseCallbackHandler) -> None:
        object.__setattr__(self, "_moa_inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._moa_inner, name)

    raise_error = property(lambda self: self._moa_inner.raise_error)  # type: ignore[assignment]
    run_inline = property(lambda self: self._moa_inner.run_inline)  # type: ignore[assignment]


for _name, _scrub_args in _EVENTS.items():
    setattr(_Delegate, _name, _event(_name, _scrub_args)[0])
_Delegate.on_llm_end = _flush_then("on_llm_end", True)  # type: ignore[method-assign]


def shield_callbacks(callbacks: Any, call: Any) -> Any:
    """The callbacks a child run gets: every handler shielded (see `_shielded`).

    `callbacks` is a config's (a list, a manager or None). None means the handlers
    LangChain would find by itself: the ambient parent config's, then the environment's
    (a ``LANGSMITH_TRACING`` tracer, ``set_debug``) and context managers'
    (``collect_runs``); they are gathered here so that they are shielded too. Returns
    None when there is no handler at all (nothing to pass).
    """
    if callbacks is None:
        ambient = var_child_runnable_config.get()
        callbacks = ambient.get("callbacks") if ambient else None
    if callbacks is None:
        callbacks = CallbackManager.configure()
        if not callbacks.handlers:
            return None
    if isinstance(callbacks, BaseCallbackManager):
        manager = callbacks.copy()
        handlers, inheritable = list(manager.handlers), list(manager.inheritable_handlers)
    else:
        manager = None
        handlers = inheritable = list(callbacks)
    present = {id(h) for h in handlers} | {id(getattr(h, "_moa_inner", h)) for h in handlers}
    for var, hook_inheritable, _cls, _env in configure_hooks:
        hooked = var.get()  # hidden from the child's own configure by `_child_scope`
        if hooked is not None and id(hooked) not in present:
            handlers = [*handlers, hooked]
            if hook_inheritable:
                inheritable = [*inheritable, hooked]
    shields: dict[int, BaseCallbackHandler] = {}

    def shielded(handler: BaseCallbackHandler) -> BaseCallbackHandler:
        if id(handler) not in shields:  # each its own scrubber: streams are held per handler
            shields[id(handler)] = _shielded(handler, _Scrubber(call))
        return shields[id(handler)]

    if manager is None:
        return [shielded(h) for h in handlers]
    manager.handlers = [shielded(h) for h in handlers]
    manager.inheritable_handlers = [shielded(h) for h in inheritable]
    return manager


@contextmanager
def _child_scope(child: RunnableConfig) -> Iterator[None]:
    """The context a child run starts (and steps) in: only its shielded handlers.

    - The ambient config becomes the child's: LangChain merges the ambient one (a graph
      node's, with the unshielded handlers) into a bound model's config otherwise.
    - Context-registered handlers (``collect_runs``...) are hidden: `shield_callbacks`
      already passed them, shielded, and LangChain would add the unshielded one too (it
      recognises them by identity).
    """
    tokens: list[tuple[contextvars.ContextVar, contextvars.Token]] = [
        (var_child_runnable_config, var_child_runnable_config.set(child))
    ]
    tokens += [(var, var.set(None)) for var, *_ in configure_hooks if var.get() is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)

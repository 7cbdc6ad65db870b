"""The call layer: every model call the package makes goes through here.

Proposers, the aggregator, judges, the criteria model and candidate sampling all call
`invoke` / `ainvoke` / `stream` / `astream` (one call) or `run_all` / `arun_all` (a
concurrent fan-out). So the guarantees below hold on every face because they exist once:

- **Fan-out**: threads on the sync path, tasks on the async path, never a fresh event
  loop; at most ``config["max_concurrency"]`` calls at once (as LangChain's executors read
  it), or no bound when it is unset.
- **Timeouts that end**: a call with a ``timeout`` is abandoned when its budget runs out.
  Sync calls then run on *daemon* threads, so a hung provider can never keep the process
  alive, and the budget is passed down as the client's own request timeout where the model
  takes one (OpenAI-compatible models), so the socket is closed soon after as well.
  Time a call spends queued for capacity (a local server's slot, see `queued`) does not
  count: its budget pauses while it waits and counts from when it is admitted.
- **Child-run configuration**: each call is a child run tagged ``moa:<kind>``; hidden calls
  (drafts, judges, samples) also get ``nostream``, so LangGraph's ``stream_mode="messages"``
  never shows them while tracers still record them.
- **Errors**: a failure becomes a `CallError` whose text is one line naming the role and
  the model (``proposer 2 (llama-3): AuthenticationError: ...``) with every known secret
  removed (see `redaction`). It is raised without the provider's exception attached (that
  object holds the request, headers included), and it keeps what a retry decision needs:
  `CallError.transient`, `status_code` and `error_type`.
- **Secrets**: a provider may quote its key back, in an error or in an answer. Errors are
  redacted (above); every answer (message, and streamed chunks, with a tail held back
  while it could be the start of a key split across chunks) has the known secret values
  masked (`redaction.mask_values`, values only: answers keep their hex strings). The
  callback handlers of each child run (tracers such as LangSmith, ``astream_events``,
  LangGraph's streams) are wrapped so that they receive the redacted `CallError` instead
  of the provider's exception, masked outputs and tokens, and ``serialized`` payloads
  without header or base-URL credentials (`shield_callbacks`).
- **Accounting**: every result carries the model's answer, its usage and its latency.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langgraph.errors import GraphBubbleUp
from pydantic import BaseModel

from langchain_moa._compat import configure_hooks, var_child_runnable_config
from langchain_moa.errors import (
    CallError,
    is_client_timeout,
    is_connection_error,
    is_model_rejected,
    is_transient_error,
    status_code,
)
from langchain_moa.models import model_endpoint, model_label
from langchain_moa.redaction import (
    answer_secrets,
    keep_library_log_redaction,
    mask_urls,
    mask_values,
    one_line,
    redact,
    register_models,
)

NOSTREAM = "nostream"
"""LangGraph's tag for runs whose tokens must not reach ``stream_mode="messages"``."""


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


# ------------------------------------------------------------------- layer close


class LayerClose:
    """Closes a layer early: once `quorum` calls answered, the rest get `grace` x more.

    Heavy-tailed providers make a layer wait for its slowest call. Shared by the calls of
    one layer (one fan-out, or separate graph nodes), it fixes a close time the first time
    `quorum` calls have answered: ``now + grace * (now - started)``. A call still running
    then is abandoned like a timed-out one and recorded as a straggler.
    """

    def __init__(self, quorum: int, grace: float) -> None:
        self.quorum = quorum
        self.grace = grace
        self.started = time.perf_counter()
        self.answered = 0
        self.close_at: float | None = None
        self._lock = threading.Lock()
        self._listeners: list[Any] = []

    def record(self, result: CallResult) -> None:
        """Count an answer (non-empty text); at quorum, fix the close time and tell everyone."""
        if result.message is None or not result.message.text.strip():
            return
        with self._lock:
            self.answered += 1
            if self.close_at is not None or self.answered < self.quorum:
                return
            now = time.perf_counter()
            self.close_at = now + self.grace * (now - self.started)
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    def listen(self, notify: Any) -> Any:
        """Call `notify()` when the close time is fixed; returns a function that unsubscribes."""
        with self._lock:
            self._listeners.append(notify)

        def stop() -> None:
            with self._lock:
                if notify in self._listeners:
                    self._listeners.remove(notify)

        return stop

    def closed(self, now: float) -> bool:
        return self.close_at is not None and now >= self.close_at


def _straggler(call: ModelCall, latency: float) -> CallError:
    close = call.close
    assert close is not None
    return CallError(
        f"{call.role} ({call.model_name}): straggler: dropped when the layer closed after "
        f"{close.quorum} answers, {latency:.2f} s in",
        role=call.role,
        model=call.model_name,
        error_type="Straggler",
        transient=True,
        timed_out=True,
    )


# ------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class ModelCall:
    """One request to one model: what to send, who it is, how its run is configured."""

    model: Runnable
    """A chat model, or a bound one (``model.bind_tools(...)``)."""
    messages: Sequence[BaseMessage]
    role: str
    """Who this is in messages and errors: ``"proposer 2"``, ``"aggregator"``..."""
    kind: str
    """The run's tag suffix: ``moa:<kind>`` (proposer, aggregator, judge, sample...)."""
    hidden: bool = True
    """Hidden calls get ``nostream``: their tokens never reach a messages stream."""
    metadata: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model call (``stop``, tool options...)."""
    timeout: float | None = None
    """Seconds for one attempt; None means no limit."""
    retries: int = 0
    """Extra attempts after a transient failure (single calls only; never mid-stream)."""
    close: LayerClose | None = field(default=None, compare=False)
    """The layer this call belongs to, when it may close early (see `LayerClose`)."""

    @property
    def model_name(self) -> str:
        return model_label(self.model)

    @functools.cached_property
    def runnable(self) -> Runnable:
        """What is called: `model`, asking for token usage on streams where it can."""
        return with_stream_usage(self.model)

    @property
    def tags(self) -> list[str]:
        return [f"moa:{self.kind}", NOSTREAM] if self.hidden else [f"moa:{self.kind}"]

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        """The secret values masked in this call's answer (the model's own keys first
        registered: a sampler or a user's bound model may be seen here for the first time)."""
        register_models([self.model])
        keep_library_log_redaction()
        return answer_secrets()

    def config(self, parent: RunnableConfig | None) -> RunnableConfig:
        """The child run's config: the parent's callbacks (shielded) and context, our tags
        and name."""
        base: dict[str, Any] = {
            k: v for k, v in (parent or {}).items() if k not in ("run_id", "run_name")
        }
        base["tags"] = [*base.get("tags", []), *self.tags]
        base["metadata"] = {**base.get("metadata", {}), **self.metadata}
        if self.run_name:
            base["run_name"] = self.run_name
        callbacks = shield_callbacks(base.get("callbacks"), self)
        if callbacks is not None:
            base["callbacks"] = callbacks
        return base  # type: ignore[return-value]

    def kwargs(self, remaining: float | None) -> dict[str, Any]:
        """Call options, with the remaining budget as the client's request timeout."""
        options = {k: v for k, v in self.options.items() if not (k == "stop" and v is None)}
        if (
            remaining is not None
            and "timeout" not in options
            and _takes_request_timeout(self.model)
        ):
            options["timeout"] = max(remaining, 0.001)
        return options


def with_stream_usage(model: Runnable) -> Runnable:
    """`model`, reporting token usage when it streams, if it can and was not told not to.

    OpenAI-compatible models (``ChatOpenAI`` and others with a ``stream_usage`` field) send
    no usage on a stream unless asked, and ``ChatOpenAI`` asks by itself only for OpenAI's
    own endpoint. Every stream the package makes, and every ``invoke`` that LangChain turns
    into a stream (a graph streaming messages), would then miss those tokens. A user's
    explicit ``stream_usage=False`` is kept (some servers refuse ``stream_options``). The
    copy is shallow (about 5 us): it shares the model's HTTP clients.
    """
    if isinstance(model, RunnableBinding):
        inner = with_stream_usage(model.bound)
        return model if inner is model.bound else model.model_copy(update={"bound": inner})
    if (
        "stream_usage" not in getattr(type(model), "model_fields", {})
        or getattr(model, "stream_usage", None) is True
        or "stream_usage" in model.model_fields_set  # type: ignore[attr-defined]
    ):
        return model
    return model.model_copy(update={"stream_usage": True})  # type: ignore[attr-defined]


def _takes_request_timeout(model: Any) -> bool:
    """True for models whose calls accept ``timeout=`` per request (OpenAI's SDK does).

    Checked by class name, without importing langchain-openai: an import here would run
    on the first call, inside its time budget, holding the import lock.
    """
    inner = getattr(model, "bound", model)
    return any(
        cls.__name__ == "BaseChatOpenAI" and cls.__module__.startswith("langchain_openai")
        for cls in type(inner).__mro__
    )


@dataclass
class CallResult:
    """What one call attempt gave: the answer or the error, and how long it took.

    A plain value: building one tells nobody. Observers (`observe`) hear of each finished
    attempt once, from `_finished`, where the call layer ends an attempt.
    """

    call: ModelCall
    message: AIMessage | None = None
    error: CallError | None = None
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def usage(self) -> UsageMetadata | None:
        return self.message.usage_metadata if self.message is not None else None


_observers: contextvars.ContextVar[tuple[Callable[[CallResult], None], ...]] = (
    contextvars.ContextVar("moa_call_observers", default=())
)


def _finished(result: CallResult) -> CallResult:
    """An attempt ended: tell the observers, once (the one place that does)."""
    for observer in _observers.get():
        observer(result)
    return result


@contextmanager
def observe(observer: Callable[[CallResult], None]) -> Iterator[None]:
    """Call `observer` with the `CallResult` of every call attempt made in this context.

    Retries and stragglers included; for streams the result carries no message (the
    chunks went to the caller). Cheaper than a callback handler: no run records, no
    callback manager, which at high concurrency costs the client a sixth of its calls
    per second. Tasks and worker threads started inside the context see it too.
    """
    token = _observers.set((*_observers.get(), observer))
    try:
        yield
    finally:
        _observers.reset(token)


def check_timeout(value: Any, name: str) -> float | None:
    """A timeout setting as seconds or None: ``inf``/None mean no limit; nan, <= 0 refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, inf or None, got {value!r}")
    return None if math.isinf(value) else float(value)


def _error(call: ModelCall, exc: BaseException) -> CallError:
    # Learn the failing model's keys first: a model no face registered (a sampling
    # policy, a user's bound model) may be the one whose key the provider echoes.
    register_models([call.model], again=True)
    if call.timeout is not None and is_client_timeout(exc):
        # The budget went down as the client's request timeout (`ModelCall.kwargs`), so
        # the client giving up first is the same event as the budget running out: one
        # account of it, whichever timer fired first.
        return CallError.timeout(call.role, call.model_name, call.timeout)
    return call_error(exc, call.role, call.model_name, client=call.model)


# ------------------------------------------------------------------ time budget


class _Budget:
    """One running call's timeout clock, which pauses while the call is queued (`queued`)."""

    def __init__(self, timeout: float | None, notify: Callable[[], None]) -> None:
        self.timeout = timeout
        self.started = time.perf_counter()
        self._paused_at: float | None = None
        self._depth = 0
        self._lock = threading.Lock()
        self._notify = notify
        self.abandoned = False
        """The call was given up (timed out or dropped) while its thread still runs."""

    def deadline(self) -> float | None:
        """When the budget runs out; None while queued or without a timeout."""
        with self._lock:
            if self.timeout is None or self._paused_at is not None:
                return None
            return self.started + self.timeout

    def spent(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def pause(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._paused_at = time.perf_counter()

    def resume(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth or self._paused_at is None:
                return
            self.started += time.perf_counter() - self._paused_at  # the wait is not counted
            self._paused_at = None
        self._notify()  # the waiting side learns the new deadline


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "moa_call_budget", default=None
)


@contextmanager
def queued() -> Iterator[None]:
    """Wrap a wait for capacity: the running call's timeout does not count it.

    The embedded model's HTTP transport waits for one of the server's slots inside this
    (`langchain_moa.local.SlotGate`): its calls' budgets pause while they are queued and
    count from when the slot is granted. Outside a call with a timeout it does nothing.
    """
    budget = _budget.get()
    if budget is None:
        yield
        return
    budget.pause()
    try:
        yield
    finally:
        budget.resume()


def given_up() -> bool:
    """Whether the running call was already given up (a sync call abandoned on its thread
    while it waited in `queued`): then the capacity it got should not be used."""
    budget = _budget.get()
    return budget is not None and budget.abandoned


# --------------------------------------------------------------------- sync path


class _Worker:
    """One call on a daemon thread, started in the caller's context."""

    def __init__(self, call: ModelCall, config: RunnableConfig | None, done: threading.Event):
        self.call = call
        self.started = time.perf_counter()
        self.message: AIMessage | None = None
        self.exc: BaseException | None = None
        self.finished = False
        self._done = done
        self.budget = _Budget(call.timeout, done.set)
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run, config), daemon=True, name=f"moa {call.role}"
        )
        self._thread.start()

    def _run(self, config: RunnableConfig | None) -> None:
        _budget.set(self.budget)  # this thread's own context (a copy): for `queued`
        try:
            self.message = _invoke_inline(self.call, config, self.call.timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.exc = exc
        finally:
            self.finished = True
            self._done.set()


def _invoke_inline(
    call: ModelCall, config: RunnableConfig | None, remaining: float | None
) -> AIMessage:
    child = call.config(config)
    with _child_scope(child):
        message = call.runnable.invoke(list(call.messages), child, **call.kwargs(remaining))
    return mask_message(message, call.secrets)


def _settle(worker: _Worker, now: float) -> CallResult:
    call, latency = worker.call, now - worker.started
    if not worker.finished:
        own = worker.budget.spent(now)
        error = (
            CallError.timeout(call.role, call.model_name, call.timeout or 0)
            if own or call.close is None
            else _straggler(call, latency)
        )
        return CallResult(call, error=error, latency_s=latency)
    if worker.exc is not None:
        if isinstance(worker.exc, (GraphBubbleUp, KeyboardInterrupt, SystemExit)):
            raise worker.exc
        return CallResult(call, error=_error(call, worker.exc), latency_s=latency)
    return CallResult(call, message=worker.message, latency_s=latency)


def _deadline(worker: _Worker) -> float | None:
    """When this running call must be given up: its own timeout, or its layer's close."""
    call = worker.call
    own = worker.budget.deadline()  # None while the call is queued for capacity
    ends = [own] if own is not None else []
    if call.close is not None and call.close.close_at is not None:
        ends.append(call.close.close_at)
    return min(ends) if ends else None


def run_all(
    calls: Sequence[ModelCall],
    config: RunnableConfig | None = None,
    *,
    max_concurrency: int | None = None,
) -> list[CallResult]:
    """Run `calls` concurrently on daemon threads; results in the order of `calls`.

    Never raises for a model's failure: each result holds its `CallError`. At most
    `max_concurrency` (default: ``config["max_concurrency"]``, else all) run at once; a
    call's timeout counts from its own start (time `queued` for capacity excepted), and a
    timed-out call frees its slot at once.
    Calls of a layer that closes early (`LayerClose`) are dropped as stragglers.
    """
    limit = max_concurrency or (config or {}).get("max_concurrency") or len(calls) or 1
    results: list[CallResult | None] = [None] * len(calls)
    waiting = list(range(len(calls)))[::-1]
    running: dict[int, _Worker] = {}
    changed = threading.Event()
    closes = {id(c.close): c.close for c in calls if c.close is not None}
    stop_listening = [close.listen(changed.set) for close in closes.values()]
    try:
        while waiting or running:
            now = time.perf_counter()
            while waiting and len(running) < limit:
                i = waiting.pop()
                close = calls[i].close
                if close is not None and close.closed(now):  # never started: dropped
                    results[i] = _finished(CallResult(calls[i], error=_straggler(calls[i], 0.0)))
                    continue
                running[i] = _Worker(calls[i], config, changed)
            deadlines = [d for w in running.values() if (d := _deadline(w)) is not None]
            if running:
                changed.wait(None if not deadlines else max(0.0, min(deadlines) - now))
                changed.clear()
            now = time.perf_counter()
            for i, worker in list(running.items()):
                deadline = _deadline(worker)
                if worker.finished or (deadline is not None and now >= deadline):
                    del running[i]
                    worker.budget.abandoned = not worker.finished
                    results[i] = _finished(_settle(worker, now))
                    if worker.call.close is not None:
                        worker.call.close.record(results[i])  # type: ignore[arg-type]
    finally:
        for stop in stop_listening:
            stop()
    return results  # type: ignore[return-value]


def _backoff(attempt: int) -> float:
    return min(0.25 * 2**attempt, 4.0)


def _invoke_once(call: ModelCall, config: RunnableConfig | None) -> CallResult:
    if call.timeout is None and call.close is None:  # nothing can cut it short: this thread
        started = time.perf_counter()
        try:
            message = _invoke_inline(call, config, None)
        except (GraphBubbleUp, KeyboardInterrupt):
            raise
        except Exception as exc:
            return _finished(
                CallResult(call, error=_error(call, exc), latency_s=time.perf_counter() - started)
            )
        return _finished(
            CallResult(call, message=message, latency_s=time.perf_counter() - started)
        )
    return run_all([call], config)[0]  # reported by run_all


def invoke(call: ModelCall, config: RunnableConfig | None = None) -> AIMessage:
    """One call (sync), retried `call.retries` times on transient errors; raises `CallError`.

    The error is raised outside any exception handler, so the provider's exception (which
    holds the request, headers included) is never chained to it.
    """
    for attempt in range(call.retries + 1):
        result = _invoke_once(call, config)
        if result.message is not None:
            return result.message
        assert result.error is not None
        if not result.error.transient or attempt == call.retries:
            break
        time.sleep(_backoff(attempt))
    raise result.error


def stream(call: ModelCall, config: RunnableConfig | None = None) -> Iterator[AIMessageChunk]:
    """Stream one call's chunks (sync); a failure raises `CallError`.

    A transient failure before the first chunk is retried (`call.retries`); once tokens
    have been shown, never. The timeout goes to the client as its request timeout.
    """
    attempt, started = 0, False
    while True:
        begun = time.perf_counter()
        child = call.config(config)
        iterator = call.runnable.stream(list(call.messages), child, **call.kwargs(call.timeout))
        masker = StreamMask(call.secrets)
        try:
            while True:
                try:
                    with _child_scope(child):
                        chunk = next(iterator)
                except StopIteration:
                    _finished(CallResult(call, latency_s=time.perf_counter() - begun))
                    if (rest := masker.flush()) is not None:
                        yield rest
                    return
                except (GraphBubbleUp, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    error = _error(call, exc)
                    _finished(CallResult(call, error=error, latency_s=time.perf_counter() - begun))
                    break
                started = True
                yield masker.chunk(chunk)  # type: ignore[misc]
        finally:
            iterator.close()  # type: ignore[attr-defined]
        if started or not error.transient or attempt >= call.retries:
            raise error
        time.sleep(_backoff(attempt))
        attempt += 1


# -------------------------------------------------------------------- async path


async def _ainvoke_inline(call: ModelCall, config: RunnableConfig | None) -> AIMessage:
    child = call.config(config)
    with _child_scope(child):
        message = await call.runnable.ainvoke(
            list(call.messages), child, **call.kwargs(call.timeout)
        )
    return mask_message(message, call.secrets)


async def _arun_one(
    call: ModelCall, config: RunnableConfig | None, gate: asyncio.Semaphore | None
) -> CallResult:
    """One attempt (async), reported to the observers when it ends."""
    if gate is not None:
        async with gate:
            return _finished(await _attempt(call, config))
    return _finished(await _attempt(call, config))


async def _attempt(call: ModelCall, config: RunnableConfig | None) -> CallResult:
    if call.close is not None and call.close.closed(time.perf_counter()):
        return CallResult(call, error=_straggler(call, 0.0))  # the layer closed while queued
    started = time.perf_counter()

    async def guarded() -> tuple[AIMessage | None, Exception | None]:
        # The model's own errors are caught inside, so a TimeoutError reaching wait_for
        # below can only be our budget running out (providers raise TimeoutError too).
        try:
            return await _ainvoke_inline(call, config), None
        except GraphBubbleUp:
            raise
        except Exception as exc:
            return None, exc

    if call.close is None and call.timeout is None:  # nothing can cut it short
        message, exc = await guarded()
    else:
        outcome = await _until_done(call, guarded(), started)
        if isinstance(outcome, CallResult):
            return outcome
        message, exc = outcome
    latency = time.perf_counter() - started
    result = (
        CallResult(call, error=_error(call, exc), latency_s=latency)
        if exc is not None
        else CallResult(call, message=message, latency_s=latency)
    )
    if call.close is not None:
        call.close.record(result)
    return result


async def _until_done(call: ModelCall, work: Any, started: float) -> Any:
    """Await `work` until it ends, its timeout passes or its layer closes (then cancel it).

    The timeout is the call's `_Budget`: paused while `work` is `queued` for capacity."""
    close = call.close
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(woken.set)

    stop = close.listen(wake) if close is not None else (lambda: None)
    budget = _Budget(call.timeout, wake)
    token = _budget.set(budget)
    try:
        task = asyncio.ensure_future(work)  # runs in a copy of this context: sees `budget`
    finally:
        _budget.reset(token)
    try:
        while True:
            now = time.perf_counter()
            own_end = budget.deadline()  # None while queued
            ends = [own_end] if own_end is not None else []
            if close is not None and close.close_at is not None:
                ends.append(close.close_at)
            if ends and now >= min(ends):
                task.cancel()
                own = own_end is not None and now >= own_end
                error = (
                    CallError.timeout(call.role, call.model_name, call.timeout or 0)
                    if own
                    else _straggler(call, now - started)
                )
                return CallResult(call, error=error, latency_s=now - started)
            woke = asyncio.ensure_future(woken.wait())
            await asyncio.wait(
                {task, woke},
                timeout=(min(ends) - now) if ends else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            woke.cancel()
            woken.clear()
            if task.done():
                return task.result()
    finally:
        stop()
        if not task.done():
            task.cancel()


async def arun_all(
    calls: Sequence[ModelCall],
    config: RunnableConfig | None = None,
    *,
    max_concurrency: int | None = None,
) -> list[CallResult]:
    """Async `run_all`: concurrent tasks, at most `max_concurrency` at once."""
    limit = max_concurrency or (config or {}).get("max_concurrency")
    gate = asyncio.Semaphore(limit) if limit and limit < len(calls) else None
    return list(await asyncio.gather(*(_arun_one(c, config, gate) for c in calls)))


async def ainvoke(call: ModelCall, config: RunnableConfig | None = None) -> AIMessage:
    """One call (async), retried like `invoke`; raises `CallError`."""
    for attempt in range(call.retries + 1):
        result = await _arun_one(call, config, None)
        if result.message is not None:
            return result.message
        assert result.error is not None
        if not result.error.transient or attempt == call.retries:
            break
        await asyncio.sleep(_backoff(attempt))
    raise result.error


async def astream(
    call: ModelCall, config: RunnableConfig | None = None
) -> AsyncIterator[AIMessageChunk]:
    """Async `stream`."""
    attempt, started = 0, False
    while True:
        begun = time.perf_counter()
        child = call.config(config)
        iterator = call.runnable.astream(list(call.messages), child, **call.kwargs(call.timeout))
        masker = StreamMask(call.secrets)
        try:
            while True:
                try:
                    with _child_scope(child):
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    _finished(CallResult(call, latency_s=time.perf_counter() - begun))
                    if (rest := masker.flush()) is not None:
                        yield rest
                    return
                except GraphBubbleUp:
                    raise
                except Exception as exc:
                    error = _error(call, exc)
                    _finished(CallResult(call, error=error, latency_s=time.perf_counter() - begun))
                    break
                started = True
                yield masker.chunk(chunk)  # type: ignore[misc]
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        if started or not error.transient or attempt >= call.retries:
            raise error
        await asyncio.sleep(_backoff(attempt))
        attempt += 1


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

    def __init__(self, call: ModelCall | None) -> None:
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


def shield_callbacks(callbacks: Any, call: ModelCall | None) -> Any:
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


# -------------------------------------------------------------------- accounting


def sum_usage(usages: Sequence[UsageMetadata | dict | None]) -> UsageMetadata | None:
    """Add token counts; ``None`` when no call reported usage."""
    total: UsageMetadata | None = None
    for usage in usages:
        if usage:
            total = add_usage(total, usage)  # type: ignore[arg-type]
    return total

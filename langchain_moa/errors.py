"""Every exception langchain-moa raises, and how provider exceptions are classified.

One vocabulary, exported from ``langchain_moa``:

- `ConfigError` (a `ValueError`): a construction-time mistake (a bad setting, recipe or
  config file, a missing API key, a bad input file). One line naming what is wrong and
  how to fix it, in parameter names; the CLI prints it without a traceback.
  `LocalModelNotFoundError`, `OutputBusy` and `RunStopped` are kinds of it.
- `CallError`: a model call failed; one redacted line naming the role and the model, with
  what a retry decision needs (``transient``, ``status_code``, ``error_type``...).
- `MoAError`: too few proposers answered to continue; `JudgeError`: no judge verdict.
- `ConstrainedOutputError` (a `ValueError`): a constrained answer is not usable.
- `RunInterrupted` (an `asyncio.CancelledError`): a pipeline run was cancelled.

Provider exceptions are classified by type (`is_transient_error`, `is_connection_error`,
`is_client_timeout`, `is_model_rejected`): ``isinstance`` against the SDKs' own classes
(openai, anthropic, httpx, google-api-core, langchain-core's model errors), looked up only
in modules already imported (an exception of a module nobody imported cannot occur), so
classifying imports nothing. langchain-openai's own subclasses (``OpenAIConnectionError``
in newer releases; 1.0 raises the SDK's ``APIConnectionError``) are covered by the SDK
classes they subclass. This module imports nothing from the package: every other module
may import it.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any


class ConfigError(ValueError):
    """A user-supplied setting is wrong (a setting, recipe, config file, missing API key,
    bad input file).

    The message is one line naming what is wrong and how to fix it; the CLI prints it
    without a traceback.
    """


class MoAError(RuntimeError):
    """Too few proposers of a layer answered to continue.

    `failures` holds the failed proposals (`Proposal`: model label and error text) so
    callers can decide whether to retry, fall back or report.
    """

    def __init__(self, message: str, failures: list[Any] | None = None) -> None:
        super().__init__(message)
        self.failures: list[Any] = list(failures or [])


class JudgeError(MoAError):
    """No judge produced a usable verdict for a rank."""


class CallError(RuntimeError):
    """A model call failed. The text is one redacted line naming the role and the model.

    Attributes tell a caller what a retry decision needs, without the provider's exception
    object (which holds the request, its headers included):

    - ``role``: who was called (``"aggregator"``, ``"proposer 2"``, ``"judge 1"``...);
    - ``model``: the model's name;
    - ``error_type``: the provider error's class name (``"RateLimitError"``);
    - ``status_code``: the HTTP status when there was one;
    - ``transient``: True when retrying may succeed (see `is_transient_error`);
    - ``timed_out``: True when the call's own time budget ran out;
    - ``rejected``: True when the model cannot be used as configured (a rejected key, no
      permission, an unknown model: see `is_model_rejected`);
    - ``unreachable``: True when the server could not be reached (`is_connection_error`).
    """

    def __init__(
        self,
        message: str,
        *,
        role: str,
        model: str,
        error_type: str,
        status_code: int | None = None,
        transient: bool = False,
        timed_out: bool = False,
        rejected: bool = False,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.role = role
        self.model = model
        self.error_type = error_type
        self.status_code = status_code
        self.transient = transient
        self.timed_out = timed_out
        self.rejected = rejected
        self.unreachable = unreachable

    @property
    def reason(self) -> str:
        """The text after ``role (model): ``: what went wrong."""
        prefix = f"{self.role} ({self.model}): "
        text = str(self)
        return text[len(prefix) :] if text.startswith(prefix) else text

    @classmethod
    def timeout(cls, role: str, model: str, seconds: float) -> CallError:
        return cls(
            f"{role} ({model}): TimeoutError: no answer within {seconds:g} s",
            role=role,
            model=model,
            error_type="TimeoutError",
            transient=True,
            timed_out=True,
        )


class ConstrainedOutputError(ValueError):
    """The model's constrained answer is not usable (cut off, or not the JSON asked for)."""


class LocalModelNotFoundError(ConfigError):
    """No model file for the embedded server; the message says how to get one."""


class OutputBusy(ConfigError):
    """Another pipeline run holds OUT's lock."""


class RunStopped(ConfigError):
    """The first row showed that a model cannot be used; nothing else was sent.

    `summary` is the run's `RunSummary` (what was read, written, not attempted).
    """

    def __init__(self, message: str, summary: Any) -> None:
        super().__init__(message)
        self.summary = summary


class RunInterrupted(asyncio.CancelledError):
    """The run was cancelled (Ctrl-C); `summary` (a `RunSummary`) counts what was written.

    Still a `CancelledError` (cancellation propagates as asyncio expects); OUT holds only
    complete rows, and a rerun finishes the rest exactly once.
    """

    def __init__(self, summary: Any) -> None:
        super().__init__("the run was interrupted")
        self.summary = summary


# ---------------------------------------------------------------- classification

_SDKS = ("openai", "anthropic")
_REJECTED = {
    **{sdk: ("AuthenticationError", "PermissionDeniedError", "NotFoundError") for sdk in _SDKS},
    "google.api_core.exceptions": ("Unauthenticated", "PermissionDenied", "NotFound"),
    "langchain_core.exceptions": (
        "ModelAuthenticationError", "ModelPermissionDeniedError", "ModelNotFoundError",
    ),
}  # fmt: skip
"""Errors that mean "this model cannot be used as configured": never retried."""
_NOT_RETRIED = {
    **{sdk: ("BadRequestError", "UnprocessableEntityError") for sdk in _SDKS},
    "google.api_core.exceptions": ("InvalidArgument",),
    "langchain_core.exceptions": ("ModelInvalidRequestError", "ContextOverflowError",
                                  "ModelRefusalError"),
}  # fmt: skip
_TRANSIENT = {
    # APIConnectionError covers APITimeoutError
    "openai": ("APIConnectionError", "RateLimitError", "InternalServerError"),
    "anthropic": ("APIConnectionError", "RateLimitError", "InternalServerError",
                  "OverloadedError"),
    "httpx": ("TransportError",),  # connect, read, write and pool timeouts, protocol errors
    "google.api_core.exceptions": ("ServiceUnavailable", "TooManyRequests",
                                   "ResourceExhausted", "DeadlineExceeded",
                                   "InternalServerError"),
    "langchain_core.exceptions": ("ModelRateLimitError", "ModelAPIError",
                                  "ModelConnectionError", "ModelTimeoutError"),
}  # fmt: skip
_CONNECTION = {
    **{sdk: ("APIConnectionError",) for sdk in _SDKS},
    "httpx": ("ConnectError",),
    "langchain_core.exceptions": ("ModelConnectionError",),
}
_CLIENT_TIMEOUT = {
    **{sdk: ("APITimeoutError",) for sdk in _SDKS},
    "httpx": ("TimeoutException",),
    "langchain_core.exceptions": ("ModelTimeoutError",),
}
_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})
_REJECTED_STATUS = frozenset({401, 403, 404})


def _loaded(table: dict[str, tuple[str, ...]]) -> tuple[type, ...]:
    """The exception classes `table` names, from the modules that are imported.

    An exception of a module that was never imported cannot have been raised, so nothing
    is imported here (classifying stays cheap and never runs a provider's import).
    """
    found: list[type] = []
    for module, names in table.items():
        loaded = sys.modules.get(module)
        if loaded is not None:
            found += [c for n in names if isinstance(c := getattr(loaded, n, None), type)]
    return tuple(found)


def status_code(exc: BaseException) -> int | None:
    """The HTTP status a provider error carries (on itself or its response), if any."""
    for holder in (exc, getattr(exc, "response", None)):
        status = getattr(holder, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_transient_error(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed.

    Retried: connection errors, client-side timeouts, rate limits (429), request timeouts
    (408), conflicts (409) and server errors (5xx). Not retried: authentication,
    permission, not-found and bad-request errors (other 4xx), `ValueError` and `TypeError`
    (a malformed request fails the same way every time), and anything unrecognised.
    Provider errors are recognised by type (the SDKs' classes, see the module docstring)
    and by the HTTP status they carry. A `CallError` answers with its own `transient`
    flag, computed from the provider's error when it was raised.
    """
    if isinstance(exc, CallError):
        return exc.transient
    if isinstance(exc, (ValueError, TypeError)):
        return False
    if isinstance(exc, _loaded(_REJECTED) + _loaded(_NOT_RETRIED)):
        return False
    status = status_code(exc)
    if status is not None:
        return status >= 500 or status in _TRANSIENT_STATUS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, _loaded(_TRANSIENT))


def is_client_timeout(exc: BaseException) -> bool:
    """A timeout raised by the model's own HTTP client (an SDK, httpx) or asyncio."""
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, *_loaded(_CLIENT_TIMEOUT)))


def is_connection_error(exc: BaseException) -> bool:
    """The server was not reached (refused, no route, DNS): not a timeout, not an HTTP error."""
    reached = (ConnectionError, socket.gaierror, *_loaded(_CONNECTION))
    return isinstance(exc, reached) and not is_client_timeout(exc)


def is_model_rejected(exc: BaseException) -> bool:
    """The model cannot be used as configured: a rejected key, no permission, unknown model."""
    return status_code(exc) in _REJECTED_STATUS or isinstance(exc, _loaded(_REJECTED))


def install_command(extra: str) -> str:
    """The command that installs `extra` the way this copy of langchain-moa was installed.

    From a source checkout (an editable install, ``pip install -e .``) that is
    ``pip install -e ".[extra]"`` (the checkout's path when it is not the current
    directory); from a package index, ``pip install 'langchain-moa[extra]'``.
    """
    source = _editable_source()
    if source is None:
        return f"pip install 'langchain-moa[{extra}]'"
    import os

    where = "." if os.path.realpath(source) == os.path.realpath(os.getcwd()) else source
    return f'pip install -e "{where}[{extra}]"'


def _editable_source() -> str | None:
    """The checkout directory of an editable install (PEP 610 direct_url.json), or None."""
    import json
    from importlib.metadata import PackageNotFoundError, distribution
    from urllib.parse import unquote, urlsplit

    try:
        text = distribution("langchain-moa").read_text("direct_url.json")
        info = json.loads(text) if text else {}
    except (PackageNotFoundError, ValueError, OSError):
        return None
    if not isinstance(info, dict) or not (info.get("dir_info") or {}).get("editable"):
        return None
    url = urlsplit(str(info.get("url", "")))
    return unquote(url.path) if url.scheme == "file" and url.path else None


__all__ = [
    "CallError",
    "ConfigError",
    "ConstrainedOutputError",
    "JudgeError",
    "LocalModelNotFoundError",
    "MoAError",
    "OutputBusy",
    "RunInterrupted",
    "RunStopped",
    "install_command",
    "is_client_timeout",
    "is_connection_error",
    "is_model_rejected",
    "is_transient_error",
    "status_code",
]

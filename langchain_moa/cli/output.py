"""What the CLI prints through: consoles, exit codes, the spinner, the log handler."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from rich.console import Console

from langchain_moa.errors import CallError, ConfigError, MoAError
from langchain_moa.redaction import one_line

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _Spinner:
    """A transient spinner on stderr while the models work (terminal only).

    It never redirects stdout (Rich's ``redirect_stdout`` would move a plain ``print`` from a
    piped stdout to stderr, and swallows blank lines): instead everything the CLI prints
    while a spinner may be up goes through `_TurnView`, which stops and clears the spinner
    first. It can be started again after (``start``/``stop`` pair up any number of times),
    and its text changed while it runs (``update``).
    """

    def __init__(self, text: str = "") -> None:
        self._text = text
        self._live: Any = None
        self._spinner: Any = None

    def start(self, text: str | None = None) -> None:
        if text is not None:
            self._text = text
        if self._live is not None or not err.is_terminal:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        self._spinner = Spinner("dots", text=self._text, style="status.spinner")
        self._live = Live(
            self._spinner,
            console=err,
            transient=True,
            refresh_per_second=12.5,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def update(self, text: str) -> None:
        self._text = text
        if self._spinner is not None:
            self._spinner.update(text=text)

    def stop(self) -> None:
        """Stop and erase the spinner line (a no-op when it is not running)."""
        live, self._live, self._spinner = self._live, None, None
        if live is not None:
            live.stop()

    def __enter__(self) -> _Spinner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _OpenLine:
    """Whether the streamed answer's last line on stdout is still open (no newline yet).

    A log record printed then would land in the middle of the answer's line when stdout
    and stderr are the same screen (a terminal, or ``2>&1``): `_LogHandler` ends the line
    on stderr first. Stdout itself never gets the extra newline (the answer stays as is).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open = False

    def wrote(self, text: str) -> None:
        with self.lock:
            self.open = not text.endswith("\n")


stdout_line = _OpenLine()


def _same_destination(a: Any, b: Any) -> bool:
    """True when two streams write to the same file, pipe or terminal."""
    try:
        x, y = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


class _LogHandler(logging.StreamHandler):
    """Log lines on stderr, each on its own line even in the middle of a streamed answer."""

    def emit(self, record: logging.LogRecord) -> None:
        with stdout_line.lock:
            if stdout_line.open and _same_destination(sys.stdout, self.stream):
                try:
                    sys.stdout.flush()  # the answer so far, then the line break after it
                    self.stream.write("\n")
                except (OSError, ValueError):  # pragma: no cover - a closed stream
                    pass
                stdout_line.open = False  # the answer goes on below the log line
            super().emit(record)


def _one_line(exc: BaseException) -> str:
    """The error as one redacted line (call errors already name the role and model)."""
    text = one_line(str(exc), limit=1000)
    if isinstance(exc, (ConfigError, MoAError, ValueError, FileNotFoundError, CallError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, code: int) -> int:
    err.print(f"moa: error: {message}", markup=False)
    return code

"""Durable output: OUT appended one fsynced line per row, its lock, its errors file."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_moa.data.rows import _unicode_error
from langchain_moa.errors import ConfigError, OutputBusy


def completed_ids(
    path: Path, *, inspect: Callable[[dict[str, Any]], None] | None = None
) -> set[str]:
    """Ids already in OUT; a torn last line (killed mid-write) is cut off first.

    `inspect` sees every complete row of OUT as it streams by (to compare it with the input).
    """
    if not path.exists():
        return set()
    ids: set[str] = set()
    with open(path, "rb+") as handle:
        keep = 0
        for raw in handle:  # streamed: OUT may be far larger than memory
            if not raw.endswith(b"\n"):
                break  # the torn tail
            keep += len(raw)
            if not raw.strip():
                continue
            try:
                stored = json.loads(raw)
                ids.add(str(stored["id"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                raise ConfigError(
                    f"{path} has a line that is not a pipeline output row; use a new OUT file"
                ) from None
            if inspect is not None:
                inspect(stored)
        handle.seek(0, os.SEEK_END)
        if handle.tell() != keep:
            handle.truncate(keep)
    return ids


def output_line(row: dict[str, Any]) -> bytes:
    """`row` as one UTF-8 JSON line; ValueError when its text is not valid Unicode.

    A lone surrogate (a model's answer can hold one, JSON escapes allow it) would make OUT
    a file `datasets` cannot load, so such a row is a failed row, never written.
    """
    text = json.dumps(row, ensure_ascii=False, default=str)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError as exc:
        raise _unicode_error(exc, "the output row", "it is not written") from None


class JsonlAppender:
    """Appends rows durably: one line per row, flushed and fsynced before returning.

    Every line is valid UTF-8: text that cannot be encoded (a lone surrogate in a reason or
    an id) is written as JSON ``\\u`` escapes instead of stopping the run.
    """

    def __init__(self, path: Path, mode: str = "a") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, mode + "b")
        self._lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        try:
            line = output_line(row)
        except ValueError:
            line = json.dumps(row, default=str).encode("ascii") + b"\n"
        self.write_line(line)

    def write_line(self, line: bytes) -> None:
        """One encoded line (`output_line`), durably."""
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def errors_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def lock_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def lock_output(output: Path) -> Any:
    """Hold OUT's lock file for the run (an OS lock: a killed run releases it)."""
    from filelock import FileLock, Timeout

    path = lock_path_for(output)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
        raise OutputBusy(
            f"another run is writing {output} (it holds {path}); wait for it to finish or "
            "choose another OUT"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path}: {exc.strerror or type(exc).__name__}; choose a writable OUT"
        ) from None
    return lock


def _same_file(a: Path, b: Path) -> bool:
    """The same file: the same path once resolved (symlinks), or the same inode (hardlinks)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: Path, input_path: Path) -> None:
    """Refuse an OUT whose files (OUT, its errors file, its lock) would overwrite the input.

    Checked before any of them is opened: the errors file is rewritten and the lock
    truncated at the start of a run, so ``moa generate X.errors.jsonl X`` would empty it.
    """
    if _same_file(output, input_path):
        raise ConfigError(f"OUT {output} is the input file; choose another OUT")
    for what, path in (("errors file", errors_path_for(output)), ("lock", lock_path_for(output))):
        if _same_file(path, input_path):
            raise ConfigError(
                f"OUT {output} would overwrite the input: its {what} {path} is the input "
                "file; choose another OUT"
            )


def _open_outputs(output: Path, errors_path: Path) -> tuple[JsonlAppender, JsonlAppender]:
    opened: list[JsonlAppender] = []
    try:
        for path, mode in ((output, "a"), (errors_path, "w")):
            opened.append(JsonlAppender(path, mode))
    except OSError as exc:
        for appender in opened:
            appender.close()
        raise ConfigError(
            f"cannot write {exc.filename or output}: {exc.strerror or type(exc).__name__}; "
            "choose a writable OUT"
        ) from None
    return opened[0], opened[1]

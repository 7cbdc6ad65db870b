"""MoAA data pipelines: SFT answers from an MoA, preference pairs from an MoA judge.

`generate` writes TRL SFT rows (``{"messages": [..., {"role": "assistant", ...}]}``) and
`label` writes TRL DPO rows in conversational form (``{"prompt": [...], "chosen": [...],
"rejected": [...]}``, every row alike, so each column has one type) from a JSONL input
whose rows hold a ``prompt`` string or a ``messages`` list, plus an optional ``id`` (and,
for `label`, optional ``responses`` to rank).

Exactly once: a row's identity is its ``id``, else a hash of its content (the conversation,
with a run-wide ``system`` message where it applies, plus ``responses`` for `label`), so
editing, reordering or appending to the input never skips or repeats a prompt. An ``id``
marks its row done: a row whose id is in OUT is skipped even when its content was edited
since, and the summary says so (``changed``).
Each finished row is appended to OUT as one line, flushed and fsynced; a re-run first
drops a torn last line (a kill mid-write), then skips every row whose identity is already
there. An exclusive lock (``OUT.lock``) keeps a second run off the same OUT. Content that
appears twice is answered once and reported, unless asked for (``keep_duplicates``).
Failed, malformed and duplicate rows go to ``OUT.errors.jsonl`` with one complete line of
reason each. Whatever its bytes (invalid UTF-8, a lone surrogate, a role a plain
conversation cannot hold, nesting too deep to parse), a bad line is one malformed row,
found when the input is read, before any model call.

Before any row is sent: none of the files a run writes (OUT, its errors file, its lock) may
be the input, OUT and its errors file must be writable, a Hub upload needs a token. The
first row then runs alone: if a model cannot be reached (connection refused, unknown model,
rejected key) the run stops there, before spending anything on the other rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, convert_to_messages
from langchain_core.runnables import RunnableConfig

from langchain_moa import calls
from langchain_moa.calls import CallResult, ModelCall
from langchain_moa.errors import ConfigError, OutputBusy, RunInterrupted, RunStopped
from langchain_moa.recipes import MAX_SAMPLES
from langchain_moa.redaction import one_line, redact

HF_PREFIX = "hf://datasets/"


@dataclass
class InputRow:
    """One usable input row. ``id`` is the explicit id or a content hash (``sha256:...``)."""

    id: str
    line: int
    prompt: str | None
    messages: list[dict[str, Any]]
    responses: list[str] | None = None
    explicit: bool = False
    """The id came from the input (not a content hash): OUT may hold other content under it."""

    @property
    def identity(self) -> str:
        """What decides the shard: the id, without a duplicate's ``#k`` suffix."""
        return self.id.split("#", 1)[0]


@dataclass
class RunSummary:
    """What a pipeline run did; the counts add up to `read`."""

    read: int = 0
    """Non-blank input lines."""
    other_shards: int = 0
    skipped: int = 0
    """Already in OUT from an earlier run."""
    written: int = 0
    failed: int = 0
    malformed: int = 0
    duplicates: int = 0
    not_attempted: int = 0
    """Rows left alone because the run stopped early (see `RunStopped`)."""
    interrupted: int = 0
    """Rows not finished when the run was cancelled (Ctrl-C): none written, a rerun does
    them (see `RunInterrupted`)."""
    changed: list[dict[str, Any]] = field(default_factory=list)
    """Rows counted in `skipped` whose explicit id is in OUT with other content: not redone
    (an id marks a row done). Each is ``{"id", "line", "kind": "changed", "reason"}``."""
    errors_path: Path | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    uploaded_to: str | None = None
    """The Hub commit URL when the run uploaded OUT."""
    model_calls: int = 0
    """Model calls the rows made (retries and re-asks included)."""
    finished_at: list[float] = field(default_factory=list)
    """Seconds since the start at which each row finished (for throughput plots)."""

    @property
    def total(self) -> int:
        return self.read

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and self.malformed == 0
            and self.not_attempted == 0
            and self.interrupted == 0
        )

    def describe(self) -> str:
        """``read 5 rows: 1 already done, 2 written, 1 failed, 1 malformed``."""
        done = "already done"
        if self.changed:
            done += f" ({len(self.changed)} with changed content under the same id)"
        parts = [
            (self.other_shards, "in other shards"),
            (self.skipped, done),
            (self.written, "written"),
            (self.failed, "failed"),
            (self.malformed, "malformed"),
            (self.duplicates, "duplicate" if self.duplicates == 1 else "duplicates"),
            (self.not_attempted, "not attempted"),
            (self.interrupted, "not done (interrupted; run again to finish them)"),
        ]
        shown = [f"{n} {what}" for n, what in parts if n or what in ("written", "failed")]
        return f"read {self.read} row{'s' if self.read != 1 else ''}: " + ", ".join(shown)


# ------------------------------------------------------------------------ input


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> (2, 4): this process takes shard 2 of 4 (1-based)."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 1/4") from None
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: I must be between 1 and N (N >= 1), e.g. 1/4")
    return index, count


def in_shard(row: InputRow, shard: tuple[int, int] | None) -> bool:
    """Deterministic by identity: the same row lands in the same shard on every machine."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.sha256(row.identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count == index - 1


def content_id(messages: list[dict[str, Any]], responses: list[str] | None = None) -> str:
    """A stable id for a row without one: a hash of its conversation (and responses).

    A ``prompt`` string counts as the one-message conversation it stands for.
    """
    payload: dict[str, Any] = {"messages": messages}
    if responses is not None:
        payload["responses"] = responses
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def resolve_input(source: str | Path) -> Path:
    """A local path, or ``hf://datasets/owner/name/path/in/repo.jsonl`` via huggingface_hub."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX) :].split("/")
        if len(parts) < 3:
            raise ConfigError(f"{text}: expected hf://datasets/OWNER/NAME/PATH.jsonl")
        return _from_hub("/".join(parts[:2]), "/".join(parts[2:]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    return path


def _from_hub(repo_id: str, filename: str) -> Path:
    """Download (or reuse the cached copy of) a dataset file; one quick try when offline."""
    from langchain_moa.hub import hub_file

    return hub_file(repo_id, filename, repo_type="dataset", fix="use a local file")


# Roles a pipeline row can hold: plain conversations. A tool result needs the assistant's
# tool call it answers, which a role/content row does not carry.
_ROLE_TYPES = (HumanMessage, AIMessage, SystemMessage)


def _message_dicts(messages: Any) -> list[dict[str, Any]]:
    """The conversation as role/content dicts, checked the way the models will read it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    result = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m["role"]
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role must be a string")
        message = {"role": role, "content": m["content"]}
        if role in ("tool", "function"):
            converted = None
        else:
            try:
                (converted,) = convert_to_messages([message])
            except Exception as exc:  # unknown role, content of the wrong shape...
                raise ValueError(f"messages[{i}]: {_exception_text(exc)}") from None
        if not isinstance(converted, _ROLE_TYPES):
            raise ValueError(
                f"messages[{i}]: role {role!r} is not supported; rows are conversations of "
                "system, user and assistant messages (a tool result needs the call it answers)"
            )
        result.append(message)
    return result


def _exception_text(exc: BaseException) -> str:
    text = one_line(str(exc), 300)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse(data: Any, with_responses: bool) -> tuple[str | None, list[dict], list[str] | None]:
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in data:
        messages, prompt = _message_dicts(data["messages"]), None
    elif isinstance(data.get("prompt"), str) and data["prompt"].strip():
        prompt = data["prompt"]
        messages = [{"role": "user", "content": prompt}]
    else:
        raise ValueError("needs a non-empty 'prompt' string or a 'messages' list")
    responses = data.get("responses") if with_responses else None
    if responses is not None and (
        not isinstance(responses, list) or not all(isinstance(r, str) for r in responses)
    ):
        raise ValueError("'responses' must be a list of strings")
    return prompt, messages, responses


def _explicit_id(data: dict[str, Any]) -> str | None:
    value = data.get("id")
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"'id' must be a string or a number, got {type(value).__name__}")
    return str(value)


def _unicode_error(
    exc: UnicodeEncodeError, where: str, then: str = "fix that escape in the input"
) -> ValueError:
    bad = exc.object[exc.start : exc.end].encode("utf-8", "backslashreplace").decode("ascii")
    return ValueError(
        f"{where} holds a lone surrogate {bad} (half of a UTF-16 pair), which is not valid "
        f"Unicode; {then}"
    )


def _has_system(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] in _SYSTEM_ROLES for m in messages)


_SYSTEM_ROLES = ("system", "developer")


def check_system(system: str | None) -> None:
    """A run-wide system message is a non-empty string (or None)."""
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise ConfigError("--system is empty; give the system message's text or leave it out")


@dataclass
class _Parsed:
    explicit_id: str | None
    prompt: str | None
    messages: list[dict[str, Any]]
    responses: list[str] | None
    content: str


def _parse_line(
    raw: bytes, *, first: bool, with_responses: bool, system: str | None = None
) -> _Parsed:
    """One input line, checked as far as a model call or OUT would need (ValueError if not)."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte {exc.start + 1} of the line: {exc.reason}); save the "
            "input as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"invalid JSON at column {exc.colno}: {exc.msg.removesuffix(' at')}"
        ) from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply to parse") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"invalid JSON: {one_line(str(exc), 200)}") from None
    try:
        prompt, messages, responses = _parse(data, with_responses)
        row_id = _explicit_id(data)
    except RecursionError:
        raise ValueError("nested too deeply to use") from None
    if system is not None and not responses and not _has_system(messages):
        prompt, messages = None, [{"role": "system", "content": system}, *messages]
    try:
        content = content_id(messages, responses)
    except UnicodeEncodeError as exc:
        raise _unicode_error(exc, "the text") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"cannot be hashed: {_exception_text(exc)}") from None
    if row_id is not None:
        try:
            row_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _unicode_error(exc, "'id'") from None
    return _Parsed(row_id, prompt, messages, responses, content)


def read_rows(
    path: Path,
    *,
    with_responses: bool = False,
    keep_duplicates: bool = False,
    system: str | None = None,
) -> tuple[list[InputRow], list[dict[str, Any]]]:
    """Parse the input JSONL: (usable rows, problems with their line numbers).

    A problem is ``{"line", "id", "kind", "reason"}`` with kind ``malformed`` (not a usable
    row) or ``duplicate`` (same content as an earlier row; with `keep_duplicates` each copy
    is a row of its own instead, id ``sha256:...#2`` for the second copy and so on).
    `with_responses` reads ``responses`` and makes them part of a row's identity (`label`).
    `system` is put first in the conversation of every row that has no system message and
    no ``responses``, before its identity is computed: it is part of the row's content.
    Lines are read as bytes and decoded one by one, so no line can stop the others.
    """
    rows: list[InputRow] = []
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    copies: dict[str, int] = {}
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                parsed = _parse_line(
                    raw, first=line_no == 1, with_responses=with_responses, system=system
                )
            except ValueError as exc:
                problems.append(_problem(line_no, None, "malformed", str(exc)))
                continue
            if parsed.explicit_id is not None:
                row_id = parsed.explicit_id
                if row_id in seen:
                    reason = f"duplicate id {row_id!r} (first on line {seen[row_id]})"
                    problems.append(_problem(line_no, row_id, "malformed", reason))
                    continue
            else:
                row_id = parsed.content
                if row_id in seen:
                    copies[row_id] = copies.get(row_id, 1) + 1
                    if not keep_duplicates:
                        reason = (
                            f"same content as line {seen[row_id]}; answered once "
                            "(pass --keep-duplicates to answer every copy)"
                        )
                        problems.append(_problem(line_no, row_id, "duplicate", reason))
                        continue
                    row_id = f"{row_id}#{copies[row_id]}"
            seen[row_id] = line_no
            rows.append(
                InputRow(
                    row_id, line_no, parsed.prompt, parsed.messages, parsed.responses,
                    explicit=parsed.explicit_id is not None,
                )
            )  # fmt: skip
    return rows, problems


def _problem(line: int, row_id: str | None, kind: str, reason: str) -> dict[str, Any]:
    return {"id": row_id, "line": line, "kind": kind, "reason": _reason_line(reason)}


def _reason_line(text: str) -> str:
    """One complete, redacted line, with any lone surrogate spelled out (``\\udc00``)."""
    text = one_line(text, 2000, whole=True)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ----------------------------------------------------------------------- output


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


def check_push_token(repo: str | None) -> None:
    """Fail before any model call when ``--push-to-hub`` could not upload at the end."""
    if not repo:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        if "/" not in repo:
            raise HFValidationError("expected OWNER/NAME")
    except HFValidationError as exc:
        raise ConfigError(
            f"--push-to-hub {repo!r} is not a dataset repo id: {one_line(str(exc))}"
        ) from None
    if not (os.environ.get("HF_TOKEN") or get_token()):
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token: set HF_TOKEN (or run `hf auth login`)"
        )


# ----------------------------------------------------------------- the run loop


class _Watch:
    """Sees every model call the rows make (through `calls.observe`): counts them for the
    progress bar and notes the failures that say a model cannot be used at all."""

    def __init__(self, on_call: Callable[[], None]) -> None:
        self.calls = 0
        self.blocked: list[str] = []
        """Rejected keys, unknown models: no row can succeed with this config."""
        self.connection: list[str] = []
        """Nothing listening, or the network is down (a retry may have saved the row)."""
        self._on_call = on_call

    def __call__(self, result: CallResult) -> None:
        self.calls += 1
        self._on_call()
        error = result.error
        if error is None:
            return
        if error.rejected:  # classified by type when the call failed (`errors`)
            self.blocked.append(str(error))
        elif error.unreachable:
            self.connection.append(str(error))


Worker = Callable[[InputRow], Awaitable[dict[str, Any]]]


async def run_rows(
    rows: Sequence[InputRow],
    problems: Sequence[dict[str, Any]],
    worker: Worker,
    output: Path,
    *,
    input_path: Path | None = None,
    concurrency: int = 4,
    description: str = "rows",
    progress: bool | None = None,
    shard: tuple[int, int] | None = None,
    calls_per_row: int | None = None,
    push_to_hub: str | None = None,
    same_input: Callable[[InputRow, dict[str, Any]], bool] | None = None,
) -> RunSummary:
    """Run `worker` over the rows not yet in OUT, `concurrency` at a time, exactly once.

    `same_input(row, stored)` says whether a row of OUT was made from the input row with the
    same explicit id as it is now; rows where it is False are reported as ``changed``.
    """
    if input_path is not None:
        check_not_input(output, input_path)
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    check_push_token(push_to_hub)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of {output}: {exc.strerror or type(exc).__name__}"
        ) from None
    lock = lock_output(output)
    try:
        summary = RunSummary(read=len(rows) + len(problems))
        summary.errors_path = errors_path_for(output)
        out, errors = _open_outputs(output, summary.errors_path)
        try:
            changed: set[str] = set()
            done = completed_ids(output, inspect=_changed_finder(rows, same_input, changed))
            await _run(
                rows, problems, worker, done, changed, out, errors, summary,
                concurrency=concurrency, description=description, progress=progress,
                shard=shard, calls_per_row=calls_per_row,
            )  # fmt: skip
        except asyncio.CancelledError as exc:
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted(summary) from None
        finally:
            out.close()
            errors.close()
    finally:
        lock.release()
    if push_to_hub:
        summary.uploaded_to = upload_to_hub(output, push_to_hub)
    return summary


def _changed_finder(
    rows: Sequence[InputRow],
    same_input: Callable[[InputRow, dict[str, Any]], bool] | None,
    changed: set[str],
) -> Callable[[dict[str, Any]], None] | None:
    """An `inspect` for `completed_ids` adding to `changed` the explicit ids whose row in
    OUT was made from other content (an OUT row of another shape is not judged)."""
    explicit = {row.id: row for row in rows if row.explicit}
    if same_input is None or not explicit:
        return None

    def inspect(stored: dict[str, Any]) -> None:
        row = explicit.get(str(stored["id"]))
        if row is None:
            return
        try:
            same = same_input(row, stored)
        except (KeyError, TypeError, IndexError, AttributeError):
            return
        if not same:
            changed.add(row.id)

    return inspect


CHANGED_REASON = (
    "already in OUT under this id with other content; not redone (an id marks its row done: "
    "to redo it, remove its line from OUT or give it a new id)"
)


async def _run(
    rows: Sequence[InputRow],
    problems: Sequence[dict[str, Any]],
    worker: Worker,
    done: set[str],
    changed: set[str],
    out: JsonlAppender,
    errors: JsonlAppender,
    summary: RunSummary,
    *,
    concurrency: int,
    description: str,
    progress: bool | None,
    shard: tuple[int, int] | None,
    calls_per_row: int | None,
) -> None:
    from tqdm.auto import tqdm

    for problem in problems:
        errors.write(problem)
        summary.failures.append(problem)
        if problem["kind"] == "duplicate":
            summary.duplicates += 1
        else:
            summary.malformed += 1
    mine = [row for row in rows if in_shard(row, shard)]
    summary.other_shards = len(rows) - len(mine)
    todo = [row for row in mine if row.id not in done]
    summary.skipped = len(mine) - len(todo)
    for row in mine:
        if row.id in changed:
            note = _problem(row.line, row.id, "changed", CHANGED_REASON)
            errors.write(note)
            summary.changed.append(note)

    bar = tqdm(
        total=len(todo),
        desc=description,
        unit="row",
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )
    planned = f"/{calls_per_row * len(todo)}" if calls_per_row else ""
    shown = [0.0]

    def show_calls() -> None:
        """Life on slow rows: the call count moves while the row count waits."""
        now = time.monotonic()
        redraw = now - shown[0] >= 0.2  # at most 5 redraws a second at any call rate
        bar.set_postfix_str(f"model calls {watch.calls}{planned}", refresh=redraw)
        if redraw:
            shown[0] = now

    watch = _Watch(show_calls)
    started = time.monotonic()

    async def attempt(row: InputRow) -> bytes | None:
        """The row's output line, or None after recording why it failed."""
        try:
            line = output_line({"id": row.id, **await worker(row)})
        except Exception as exc:
            failure = {"id": row.id, "line": row.line, "kind": "failed",
                       "reason": error_reason(exc)}  # fmt: skip
            errors.write(failure)
            summary.failures.append(failure)
            summary.failed += 1
            bar.update(1)
            return None
        bar.update(1)  # not when cancelled: the bar shows the rows really done
        return line

    def keep(row: InputRow, line: bytes) -> None:
        out.write_line(line)
        summary.written += 1
        summary.finished_at.append(round(time.monotonic() - started, 3))

    try:
        if not todo:
            return
        with calls.observe(watch):  # the lanes' tasks start inside: they see it too
            await _first_then_the_rest(todo, attempt, keep, watch, summary, errors, concurrency)
    except asyncio.CancelledError:
        summary.interrupted = len(todo) - summary.written - summary.failed
        raise
    finally:
        summary.model_calls = watch.calls
        bar.close()


async def _first_then_the_rest(
    todo: Sequence[InputRow],
    attempt: Callable[[InputRow], Awaitable[bytes | None]],
    keep: Callable[[InputRow, bytes], None],
    watch: _Watch,
    summary: RunSummary,
    errors: JsonlAppender,
    concurrency: int,
) -> None:
    """The first row alone (it tells whether the models can be used), then the rest."""
    first, rest = todo[0], iter(todo[1:])
    result = await attempt(first)
    cannot_use = watch.blocked or (watch.connection if result is None else [])
    if cannot_use:
        if result is not None:  # an answer made without a model the config names
            failure = {"id": first.id, "line": first.line, "kind": "failed",
                       "reason": cannot_use[0]}  # fmt: skip
            errors.write(failure)
            summary.failures.append(failure)
            summary.failed += 1
        if len(todo) == 1:
            return  # nothing left to protect: an ordinary failed row
        summary.not_attempted = len(todo) - 1
        raise RunStopped(
            f"stopped after the first row, before sending the other {len(todo) - 1}: "
            f"{cannot_use[0]}",
            summary,
        )
    if result is not None:
        keep(first, result)

    async def lane() -> None:
        for row in rest:  # one shared iterator: each row is taken by exactly one lane
            found = await attempt(row)
            if found is not None:
                keep(row, found)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(todo) - 1))))


def error_reason(exc: BaseException) -> str:
    """One complete, redacted line for the errors file (call errors already name the model)."""
    text = _reason_line(str(exc))
    if isinstance(exc, (calls.CallError, ConfigError)) or not text:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# ------------------------------------------------------------------ row records


def _usage(usage: Any) -> dict[str, int] | None:
    """Token counts in one shape for every row (provider extras vary from call to call)."""
    if not usage:
        return None
    return {k: int(usage.get(k) or 0) for k in ("input_tokens", "output_tokens", "total_tokens")}


def _layers_record(message: Any) -> list[dict[str, Any]]:
    layers = message.response_metadata.get("moa", {}).get("layers", [])
    return [
        {
            "layer": layer["layer"],
            "proposals": [
                {**p, "usage": _usage(p.get("usage")), "latency_s": float(p["latency_s"])}
                for p in layer["proposals"]
            ],
        }
        for layer in layers
    ]


def _judge_record(details: dict[str, Any]) -> dict[str, Any]:
    """The judge's account, with its token counts in the one shape rows use."""
    return {**details, "usage": _usage(details.get("usage"))}


# -------------------------------------------------------------------- pipelines


async def agenerate(
    input: str | Path,
    output: str | Path,
    moa: Any,
    *,
    concurrency: int = 4,
    progress: bool | None = None,
    shard: str | tuple[int, int] | None = None,
    keep_duplicates: bool = False,
    push_to_hub: str | None = None,
    system: str | None = None,
) -> RunSummary:
    """For every input prompt, the MoA answer as a TRL SFT row.

    `system` is put first in every row's conversation that has no system message of its
    own (a row with one keeps it): the MoA answers under it and the row in OUT records it.
    It is part of the row's content, so of its identity: rerun with another `system`, a row
    without an ``id`` is new content (answered again), one with an ``id`` is reported as
    changed.
    """
    check_system(system)
    source = resolve_input(input)
    rows, problems = read_rows(source, keep_duplicates=keep_duplicates, system=system)

    async def worker(row: InputRow) -> dict[str, Any]:
        message = await moa.ainvoke(convert_to_messages(row.messages))
        if not isinstance(message.content, str) or not message.content.strip():
            raise ValueError("the MoA returned an empty answer")
        return {
            "messages": [*row.messages, {"role": "assistant", "content": message.content}],
            "proposals": _layers_record(message),
            "usage": _usage(message.usage_metadata),
            "model": message.response_metadata.get("model_name"),
        }

    def same_input(row: InputRow, stored: dict[str, Any]) -> bool:
        return stored["messages"][:-1] == row.messages

    engine = getattr(moa, "engine", None)
    return await run_rows(
        rows, problems, worker, Path(output), input_path=source, concurrency=concurrency,
        description="generate", progress=progress, shard=_shard(shard),
        calls_per_row=getattr(engine, "calls_per_answer", None), push_to_hub=push_to_hub,
        same_input=same_input,
    )  # fmt: skip


def _shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    return parse_shard(shard) if isinstance(shard, str) else shard


SAMPLE_TEMPERATURES = (0.6, 1.2)
"""Without a temperature, sample i of n is drawn at one spread evenly over this range."""


def _sample_calls(
    policy: Any, messages: list[dict[str, Any]], samples: int, temperature: float | None = None
) -> list[ModelCall]:
    """One hidden call per sample: `policy` at `temperature` (default: spread over
    `SAMPLE_TEMPERATURES`), each sample with its own seed."""
    conversation = convert_to_messages(messages)
    low, high = SAMPLE_TEMPERATURES
    found = []
    for i in range(samples):
        if temperature is None:
            at = round(low + (high - low) * i / max(1, samples - 1), 2)
        else:
            at = temperature
        try:
            model = policy.bind(temperature=at, seed=1000 + i)
        except Exception:  # a model without those options still gives samples
            model = policy
        found.append(
            ModelCall(
                model=model,
                messages=conversation,
                role=f"sample {i + 1}",
                kind="sample",
                metadata={"moa_sample": i},
            )
        )
    return found


def _answers(results: list[CallResult]) -> list[str]:
    """Non-empty sampled answers; raises the first error when no sample answered."""
    answers = [r.message.text.strip() for r in results if r.message is not None]
    answers = [a for a in answers if a]
    if not answers and any(r.error for r in results):
        raise next(r.error for r in results if r.error)  # type: ignore[misc]
    return answers


async def sample_candidates(
    policy: Any,
    messages: list[dict[str, Any]],
    samples: int,
    config: RunnableConfig | None = None,
    *,
    temperature: float | None = None,
) -> list[str]:
    """`samples` answers from `policy`, concurrently (non-empty ones only), at `temperature`
    (default: spread over `SAMPLE_TEMPERATURES`)."""
    found = _sample_calls(policy, messages, samples, temperature)
    return _answers(await calls.arun_all(found, config))


def sample_candidates_sync(
    policy: Any,
    messages: list[dict[str, Any]],
    samples: int,
    config: RunnableConfig | None = None,
    *,
    temperature: float | None = None,
) -> list[str]:
    """Sync `sample_candidates`: threads, never a fresh event loop per call."""
    return _answers(calls.run_all(_sample_calls(policy, messages, samples, temperature), config))


def check_policy_options(
    has_policy: bool, *, temperature: float | None = None, system: str | None = None
) -> None:
    """Refuse the options that only shape sampled candidates when nothing is sampled."""
    check_system(system)
    if has_policy:
        return
    if temperature is not None:
        raise ConfigError(
            "--temperature needs --policy: it is the temperature candidates are sampled at, "
            "and without a policy the candidates are each row's 'responses'"
        )
    if system is not None:
        raise ConfigError(
            "--system needs --policy: it is sent to the policy that samples the candidates, "
            "and each row's 'responses' were written without it (to show the judges a system "
            "message, put it in the rows' 'messages')"
        )


async def alabel(
    input: str | Path,
    output: str | Path,
    judge: Any,
    *,
    policy: Any = None,
    samples: int = 5,
    concurrency: int = 4,
    progress: bool | None = None,
    shard: str | tuple[int, int] | None = None,
    keep_duplicates: bool = False,
    push_to_hub: str | None = None,
    temperature: float | None = None,
    system: str | None = None,
) -> RunSummary:
    """For every prompt, candidates ranked by `judge`, as a conversational TRL DPO row.

    With a `policy`, rows without ``responses`` get `samples` candidates from it, drawn at
    `temperature` (default: spread from 0.6 to 1.2) with a seed each; the judges keep their
    own temperatures. `system` (needs a `policy`) is put first in the conversation of every
    row the policy samples for that has no system message of its own: the policy answers
    under it, the judges see it as part of the conversation, the row's ``prompt`` records
    it, and it is part of the row's identity (as for `agenerate`). Rows that bring
    ``responses`` are ranked as they are.
    """
    check_policy_options(policy is not None, temperature=temperature, system=system)
    if samples < 2:
        raise ConfigError("--samples must be at least 2 (a preference pair needs two answers)")
    if samples > MAX_SAMPLES:
        raise ConfigError(
            f"--samples must be at most {MAX_SAMPLES} (pairwise judging costs samples squared "
            "calls per judge and prompt)"
        )
    source = resolve_input(input)
    rows, problems = read_rows(
        source, with_responses=True, keep_duplicates=keep_duplicates, system=system
    )
    if policy is None:
        missing = [r for r in rows if not r.responses]
        if missing:
            raise ConfigError(
                f"line {missing[0].line}: no 'responses' to rank; add them or pass --policy "
                f"to sample candidates"
            )

    async def worker(row: InputRow) -> dict[str, Any]:
        candidates = row.responses or await sample_candidates(
            policy, row.messages, samples, temperature=temperature
        )
        if len(candidates) < 2:
            raise ValueError(f"only {len(candidates)} non-empty candidate(s); need 2")
        result = await judge.arank(row.prompt or row.messages, candidates)
        rated = [s for s in result.scores if s is not None]
        if len(rated) < 2:
            raise ValueError(
                f"only {len(rated)} of {len(candidates)} candidates were rated "
                "(the others got no usable verdict); no pair to record"
            )
        if result.details["ties"]["all_equal"]:
            raise ValueError("every rated candidate scored the same; no preference to record")
        return {
            # conversational form for every row, so each column keeps one type
            "prompt": row.messages,
            "chosen": [{"role": "assistant", "content": candidates[result.chosen]}],
            "rejected": [{"role": "assistant", "content": candidates[result.rejected]}],
            "scores": result.scores,
            "candidates": list(candidates),
            "judge": _judge_record(result.details),
        }

    def same_input(row: InputRow, stored: dict[str, Any]) -> bool:
        # sampled candidates differ on every run; given responses are part of the row
        return stored["prompt"] == row.messages and (
            not row.responses or stored["candidates"] == row.responses
        )

    per_row = None
    if hasattr(judge, "calls_for"):
        given = max((len(r.responses or []) for r in rows), default=2)
        n = samples if policy is not None else given
        per_row = judge.calls_for(n) + (samples if policy is not None else 0)
    return await run_rows(
        rows, problems, worker, Path(output), input_path=source, concurrency=concurrency,
        description="label", progress=progress, shard=_shard(shard), calls_per_row=per_row,
        push_to_hub=push_to_hub, same_input=same_input,
    )  # fmt: skip


def generate(input: str | Path, output: str | Path, moa: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `agenerate` (one event loop for the whole run)."""
    return asyncio.run(agenerate(input, output, moa, **kwargs))


def label(input: str | Path, output: str | Path, judge: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `alabel` (one event loop for the whole run)."""
    return asyncio.run(alabel(input, output, judge, **kwargs))


def upload_to_hub(path: str | Path, repo: str, *, token: str | None = None) -> str:
    """Upload OUT as a dataset file (token from ``HF_TOKEN`` or the Hub login; never printed)."""
    from huggingface_hub import HfApi, get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ConfigError("--push-to-hub needs a Hugging Face token: set HF_TOKEN")
    path = Path(path)
    try:
        api = HfApi(token=token)
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        info = api.upload_file(
            path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo, repo_type="dataset"
        )
    except Exception as exc:
        text = redact(str(exc), [token]).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"upload to {repo} failed: {type(exc).__name__}: {text}") from None
    return str(getattr(info, "commit_url", None) or info)

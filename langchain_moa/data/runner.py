"""The run loop: rows not yet in OUT, exactly once, the first row alone, progress, summary."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_moa import calls
from langchain_moa.calls import CallResult
from langchain_moa.data.hub import check_push_token, upload_to_hub
from langchain_moa.data.output import (
    JsonlAppender,
    _open_outputs,
    check_not_input,
    completed_ids,
    errors_path_for,
    lock_output,
    output_line,
)
from langchain_moa.data.rows import InputRow, _problem, _reason_line, in_shard, parse_shard
from langchain_moa.errors import ConfigError, RunInterrupted, RunStopped


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


def _shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    return parse_shard(shard) if isinstance(shard, str) else shard

"""MoAA data pipelines: SFT answers from an MoA, preference pairs from an MoA judge.

`generate` writes TRL SFT rows (``{"messages": [..., {"role": "assistant", ...}]}``) and
`label` writes TRL DPO rows (``{"prompt", "chosen", "rejected"}``) from a JSONL input whose
rows hold a ``prompt`` string or a ``messages`` list, plus an optional ``id`` (and, for
`label`, optional ``responses`` to rank).

Crash safety: each finished row is appended to OUT as one JSON line, flushed and fsynced.
A re-run with the same OUT first drops a torn last line (a kill mid-write), then skips every
row whose id is already there, so a run killed at any moment and restarted ends with every
row exactly once. Rows without an ``id`` are identified by their input line number. Rows
that fail go to ``OUT.errors.jsonl`` with the reason; malformed input lines are reported
there with their line number, never skipped silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import convert_to_messages
from langchain_core.runnables import RunnableConfig

from langchain_moa import calls
from langchain_moa.calls import CallResult, ModelCall
from langchain_moa.errors import ConfigError
from langchain_moa.redaction import one_line, redact

HF_PREFIX = "hf://datasets/"


@dataclass
class InputRow:
    """One usable input row."""

    id: str
    line: int
    prompt: str | None
    messages: list[dict[str, Any]]
    responses: list[str] | None = None


@dataclass
class RunSummary:
    """What a pipeline run did."""

    total: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    errors_path: Path | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


# ------------------------------------------------------------------------ input


def resolve_input(source: str | Path) -> Path:
    """A local path, or ``hf://datasets/owner/name/path/in/repo.jsonl`` via huggingface_hub."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX) :].split("/")
        if len(parts) < 3:
            raise ConfigError(f"{text}: expected hf://datasets/OWNER/NAME/PATH.jsonl")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
        except Exception as exc:
            raise ConfigError(
                f"cannot fetch {filename} from dataset {repo_id}: {type(exc).__name__}: "
                f"{redact(str(exc)).splitlines()[0] if str(exc) else ''}"
            ) from None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    return path


def _message_dicts(messages: Any, line: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    result = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        result.append({"role": m["role"], "content": m["content"]})
    convert_to_messages(result)  # validates roles
    return result


def read_rows(path: Path) -> tuple[list[InputRow], list[dict[str, Any]]]:
    """Parse the input JSONL: (usable rows, problems with their line numbers)."""
    rows: list[InputRow] = []
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("each line must be a JSON object")
                if "messages" in data:
                    messages = _message_dicts(data["messages"], line_no)
                    prompt = None
                elif isinstance(data.get("prompt"), str) and data["prompt"].strip():
                    prompt = data["prompt"]
                    messages = [{"role": "user", "content": prompt}]
                else:
                    raise ValueError("needs a non-empty 'prompt' string or a 'messages' list")
                responses = data.get("responses")
                if responses is not None and (
                    not isinstance(responses, list)
                    or not all(isinstance(r, str) for r in responses)
                ):
                    raise ValueError("'responses' must be a list of strings")
                row_id = str(data["id"]) if data.get("id") is not None else f"line-{line_no}"
                if row_id in seen:
                    raise ValueError(f"duplicate id {row_id!r} (first on line {seen[row_id]})")
                seen[row_id] = line_no
                rows.append(InputRow(row_id, line_no, prompt, messages, responses))
            except (json.JSONDecodeError, ValueError) as exc:
                reason = (
                    f"invalid JSON: {exc.msg}"
                    if isinstance(exc, json.JSONDecodeError)
                    else str(exc)
                )
                problems.append({"line": line_no, "reason": reason})
    return rows, problems


# ----------------------------------------------------------------------- output


def completed_ids(path: Path) -> set[str]:
    """Ids already in OUT; a torn last line (killed mid-write) is cut off first."""
    if not path.exists():
        return set()
    with open(path, "rb+") as handle:
        data = handle.read()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        ids: set[str] = set()
        for raw in data[:keep].splitlines():
            if not raw.strip():
                continue
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{path} has a line that is not a pipeline output row; use a new OUT file"
                ) from None
        if keep != len(data):
            handle.truncate(keep)
    return ids


class JsonlAppender:
    """Appends rows durably: one line per row, flushed and fsynced before returning."""

    def __init__(self, path: Path, mode: str = "a") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, mode, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def errors_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


async def run_rows(
    rows: Sequence[InputRow],
    problems: Sequence[dict[str, Any]],
    worker: Callable[[InputRow], Awaitable[dict[str, Any]]],
    output: Path,
    *,
    concurrency: int = 4,
    description: str = "rows",
    progress: bool | None = None,
) -> RunSummary:
    """Run `worker` over the rows not yet in OUT, `concurrency` at a time."""
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    done = completed_ids(output)
    todo = [row for row in rows if row.id not in done]
    summary = RunSummary(total=len(rows), skipped=len(rows) - len(todo))
    summary.errors_path = errors_path_for(output)
    out = JsonlAppender(output)
    errors = JsonlAppender(summary.errors_path, mode="w")
    for problem in problems:
        errors.write({"id": None, **problem})
        summary.failures.append(problem)
        summary.failed += 1
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(
        total=len(todo),
        desc=description,
        unit="row",
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
    )

    async def one(row: InputRow) -> None:
        async with gate:
            try:
                result = await worker(row)
            except Exception as exc:
                reason = error_reason(exc)
                failure = {"id": row.id, "line": row.line, "reason": reason}
                errors.write(failure)
                summary.failures.append(failure)
                summary.failed += 1
            else:
                out.write({"id": row.id, **result})
                summary.written += 1
            finally:
                bar.update(1)

    try:
        await asyncio.gather(*(one(row) for row in todo))
    finally:
        bar.close()
        out.close()
        errors.close()
    return summary


def error_reason(exc: BaseException) -> str:
    """One complete, redacted line for the errors file (call errors already name the model)."""
    text = one_line(str(exc), limit=2000)
    if isinstance(exc, (calls.CallError, ConfigError)) or not text:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# -------------------------------------------------------------------- pipelines


def _proposals(message: Any) -> list[dict[str, Any]]:
    return message.response_metadata.get("moa", {}).get("layers", [])


async def agenerate(
    input: str | Path, output: str | Path, moa: Any, *, concurrency: int = 4,
    progress: bool | None = None,
) -> RunSummary:  # fmt: skip
    """For every input prompt, the MoA answer as a TRL SFT row."""
    rows, problems = read_rows(resolve_input(input))

    async def worker(row: InputRow) -> dict[str, Any]:
        message = await moa.ainvoke(convert_to_messages(row.messages))
        if not isinstance(message.content, str) or not message.content.strip():
            raise ValueError("the MoA returned an empty answer")
        return {
            "messages": [*row.messages, {"role": "assistant", "content": message.content}],
            "proposals": _proposals(message),
            "usage": message.usage_metadata,
            "model": message.response_metadata.get("model_name"),
        }

    return await run_rows(
        rows, problems, worker, Path(output), concurrency=concurrency,
        description="generate", progress=progress,
    )  # fmt: skip


def _sample_calls(policy: Any, messages: list[dict[str, Any]], samples: int) -> list[ModelCall]:
    """One hidden call per sample: `policy` at spread temperatures (0.6-1.2), distinct seeds."""
    conversation = convert_to_messages(messages)
    found = []
    for i in range(samples):
        temperature = round(0.6 + 0.6 * i / max(1, samples - 1), 2)
        try:
            model = policy.bind(temperature=temperature, seed=1000 + i)
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
    policy: Any, messages: list[dict[str, Any]], samples: int, config: RunnableConfig | None = None
) -> list[str]:
    """`samples` answers from `policy`, concurrently (non-empty ones only)."""
    return _answers(await calls.arun_all(_sample_calls(policy, messages, samples), config))


def sample_candidates_sync(
    policy: Any, messages: list[dict[str, Any]], samples: int, config: RunnableConfig | None = None
) -> list[str]:
    """Sync `sample_candidates`: threads, never a fresh event loop per call."""
    return _answers(calls.run_all(_sample_calls(policy, messages, samples), config))


async def alabel(
    input: str | Path,
    output: str | Path,
    judge: Any,
    *,
    policy: Any = None,
    samples: int = 5,
    concurrency: int = 4,
    progress: bool | None = None,
) -> RunSummary:
    """For every prompt, candidates ranked by `judge`, as a TRL DPO row."""
    if samples < 2:
        raise ConfigError("--samples must be at least 2 (a preference pair needs two answers)")
    rows, problems = read_rows(resolve_input(input))
    if policy is None:
        missing = [r for r in rows if not r.responses]
        if missing:
            raise ConfigError(
                f"line {missing[0].line}: no 'responses' to rank; add them or pass --policy "
                f"to sample candidates"
            )

    async def worker(row: InputRow) -> dict[str, Any]:
        candidates = row.responses or await sample_candidates(policy, row.messages, samples)
        if len(candidates) < 2:
            raise ValueError(f"only {len(candidates)} non-empty candidate(s); need 2")
        result = await judge.arank(row.prompt or row.messages, candidates)
        if result.details["ties"]["all_equal"]:
            raise ValueError("every candidate scored the same; no preference to record")
        chosen, rejected = candidates[result.chosen], candidates[result.rejected]
        if row.prompt is not None:
            prompt: Any = row.prompt
            chosen_out: Any = chosen
            rejected_out: Any = rejected
        else:
            prompt = row.messages
            chosen_out = [{"role": "assistant", "content": chosen}]
            rejected_out = [{"role": "assistant", "content": rejected}]
        return {
            "prompt": prompt,
            "chosen": chosen_out,
            "rejected": rejected_out,
            "scores": result.scores,
            "candidates": candidates,
            "judge": result.details,
        }

    return await run_rows(
        rows, problems, worker, Path(output), concurrency=concurrency,
        description="label", progress=progress,
    )  # fmt: skip


def generate(input: str | Path, output: str | Path, moa: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `agenerate` (one event loop for the whole run)."""
    return asyncio.run(agenerate(input, output, moa, **kwargs))


def label(input: str | Path, output: str | Path, judge: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `alabel` (one event loop for the whole run)."""
    return asyncio.run(alabel(input, output, judge, **kwargs))


def push_to_hub(path: str | Path, repo: str, *, token: str | None = None) -> str:
    """Upload OUT as a dataset file (token from ``HF_TOKEN``; never printed)."""
    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN")
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

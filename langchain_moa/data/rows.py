"""Input rows: reading JSONL (local or ``hf://``), checking conversations, identity, shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, convert_to_messages

from langchain_moa.data.hub import from_hub
from langchain_moa.errors import ConfigError
from langchain_moa.redaction import one_line

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
        return from_hub("/".join(parts[:2]), "/".join(parts[2:]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    return path


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

"""Reference injection: how earlier answers reach the next layer.

This is the one place that builds the text an aggregator (or a later-layer proposer)
sees. Layout: the instruction, then one line per answer, ``"\n{i}. {answer}"``. The text
is appended (after a blank line) to a leading system message, or becomes a new leading
system message. The caller's messages are never mutated: copies are returned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)


def references_text(instruction: str, answers: Sequence[str]) -> str:
    """The instruction followed by the numbered answers, one per line."""
    return instruction + "".join(f"\n{i}. {answer}" for i, answer in enumerate(answers, 1))


def _append_text(content: str | list, suffix: str) -> str | list:
    if isinstance(content, str):
        return content + suffix
    blocks = list(content)
    if blocks and isinstance(blocks[-1], str):
        blocks[-1] = blocks[-1] + suffix
    elif blocks and isinstance(blocks[-1], dict) and blocks[-1].get("type") == "text":
        blocks[-1] = {**blocks[-1], "text": blocks[-1]["text"] + suffix}
    else:
        blocks.append({"type": "text", "text": suffix})
    return blocks


Placement = Literal["first_system", "after_conversation"]


def inject_references(
    messages: Sequence[BaseMessage],
    answers: Sequence[str],
    instruction: str,
    placement: Placement = "first_system",
) -> list[BaseMessage]:
    """Return a copy of `messages` carrying the numbered answers.

    ``"first_system"`` (the reference structure): appended to a leading system message,
    or a new leading system message. ``"after_conversation"``: one system message after
    the conversation, so the conversation stays a prefix shared with the layer before
    (a provider's prompt cache then serves it; docs/benchmarks.md has the measured effect).
    """
    text = references_text(instruction, answers)
    result = list(messages)
    if placement == "after_conversation":
        return [*result, SystemMessage(content=text)]
    if placement != "first_system":
        raise ValueError(
            f"reference_placement must be 'first_system' or 'after_conversation', got {placement!r}"
        )
    return with_system_text(result, text)


def with_system_text(messages: Sequence[BaseMessage], text: str) -> list[BaseMessage]:
    """A copy of `messages` whose leading system message ends with `text`.

    Appended after a blank line to a leading system message, or put first as a new one;
    the caller's messages are not mutated.
    """
    result = list(messages)
    if result and isinstance(result[0], SystemMessage):
        first = result[0]
        result[0] = first.model_copy(update={"content": _append_text(first.content, "\n\n" + text)})
    else:
        result.insert(0, SystemMessage(content=text))
    return result


def _call_text(call: dict) -> str:
    return f"The {call['name']} tool was called with {json.dumps(call['args'], ensure_ascii=False)}"


def _describe_tool_result(message: ToolMessage, call: dict | None) -> str:
    called = (
        _call_text(call)
        if call is not None
        else f"The {message.name or message.tool_call_id} tool was called"
    )
    if getattr(message, "status", "success") == "error":
        return f"{called} and failed: {message.text}"
    return f"{called} and returned: {message.text}"


def text_only_history(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """Rewrite tool calls and tool results as plain text for models called without tools.

    Proposers are called without tools, and many providers reject tool-call turns or
    tool-result messages when no tools are declared. So each tool call and its result
    become one sentence ("The calculator tool was called with {...} and returned: 391")
    in a user-side note that asks for the answer; the assistant turn that made the calls
    keeps only its text (dropped when it has none). No assistant turn is ever written in
    a tool-call form of the package's own: small models copy the last assistant turn, and
    one that read ``[called tool ...]`` was imitated as the final answer (issue 21).
    Messages without tool parts are passed through unchanged.
    """
    result: list[BaseMessage] = []
    calls: dict[str, dict] = {}  # the calls of the pending note, by id, in call order
    notes: list[str] = []

    def flush() -> None:
        lines = [f"{_call_text(c)} and has no result yet." for c in calls.values()]
        if notes:
            ask = "these results" if len(notes) > 1 else "this result"
            lines = [*notes, *lines, f"Answer the question using {ask}."]
        if lines:
            note = "\n".join(lines)
            last = result[-1] if result else None
            if isinstance(last, HumanMessage) and isinstance(last.content, str):
                # Right after the user's turn (the calls' turn had no text): one user turn,
                # so roles still alternate; chat templates that enforce it (Mistral's,
                # on vLLM) refuse two user turns in a row.
                result[-1] = last.model_copy(update={"content": f"{last.content}\n\n{note}"})
            else:
                result.append(HumanMessage(content=note))
        notes.clear()
        calls.clear()

    for message in messages:
        if isinstance(message, ToolMessage):
            notes.append(_describe_tool_result(message, calls.pop(message.tool_call_id, None)))
            continue
        if isinstance(message, AIMessage) and message.tool_calls:
            flush()
            if message.text:
                result.append(AIMessage(content=message.text, name=message.name))
            calls.update({c.get("id") or f"#{i}": c for i, c in enumerate(message.tool_calls)})
            continue
        flush()
        result.append(message)
    flush()
    return result

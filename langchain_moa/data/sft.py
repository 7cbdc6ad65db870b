"""SFT data: the MoA answer for every prompt, as TRL SFT rows (`generate`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from langchain_core.messages import convert_to_messages

from langchain_moa.data.rows import InputRow, check_system, read_rows, resolve_input
from langchain_moa.data.runner import RunSummary, _layers_record, _shard, _usage, run_rows


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

    Args:
        input: a JSONL file, or ``hf://datasets/OWNER/NAME/FILE.jsonl``.
        output: the JSONL file rows are appended to (a rerun skips rows already there).
        moa: a `ChatMoA`, or any chat model (it is called with each row's conversation).
        concurrency: rows in flight at once.
        progress: a progress bar on stderr (default: when stderr is a terminal).
        shard: ``(i, n)`` or ``"i/n"``: only the rows whose identity falls in shard i of n.
        keep_duplicates: answer every copy of repeated content (default: once, reported).
        push_to_hub: upload OUT to this Hugging Face dataset repo when the run is done.
        system: a system message for rows without one (see above).

    Returns:
        A `RunSummary`: rows read, written, skipped, failed, and why.
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



def generate(input: str | Path, output: str | Path, moa: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `agenerate` (one event loop for the whole run)."""
    return asyncio.run(agenerate(input, output, moa, **kwargs))

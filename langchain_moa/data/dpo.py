"""DPO data: candidates ranked by an MoA judge, as conversational TRL DPO rows (`label`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from langchain_moa.data.rows import InputRow, check_system, read_rows, resolve_input
from langchain_moa.data.runner import RunSummary, _judge_record, _shard, run_rows
from langchain_moa.errors import ConfigError
from langchain_moa.recipes import MAX_SAMPLES
from langchain_moa.sampling import sample_candidates


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

    Args:
        input: a JSONL file, or ``hf://datasets/OWNER/NAME/FILE.jsonl``.
        output: the JSONL file rows are appended to (a rerun skips rows already there).
        judge: a `MoAJudge`.
        policy: a chat model that samples candidates for rows without ``responses``.
        samples: candidates per prompt drawn from `policy`.
        concurrency: rows in flight at once.
        progress: a progress bar on stderr (default: when stderr is a terminal).
        shard: ``(i, n)`` or ``"i/n"``: only the rows whose identity falls in shard i of n.
        keep_duplicates: answer every copy of repeated content (default: once, reported).
        push_to_hub: upload OUT to this Hugging Face dataset repo when the run is done.
        temperature: the policy's sampling temperature (needs `policy`).
        system: a system message for the rows the policy samples for (needs `policy`).

    Returns:
        A `RunSummary`; a row whose candidates tie is a failed row, never a made-up pair.
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



def label(input: str | Path, output: str | Path, judge: Any, **kwargs: Any) -> RunSummary:
    """Sync wrapper of `alabel` (one event loop for the whole run)."""
    return asyncio.run(alabel(input, output, judge, **kwargs))

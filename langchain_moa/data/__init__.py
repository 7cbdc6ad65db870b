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

Layout: `rows` (input parsing, identity, shards), `hub` (``hf://`` input, upload),
`output` (durable OUT, lock, errors file), `runner` (the run loop), `sft` (`generate`),
`dpo` (`label`); candidate sampling is `langchain_moa.sampling` (the judge graph uses it too).
"""

from langchain_moa.data.dpo import alabel, check_policy_options, label
from langchain_moa.data.rows import InputRow, check_system, content_id, parse_shard, read_rows
from langchain_moa.data.runner import RunSummary, run_rows
from langchain_moa.data.sft import agenerate, generate
from langchain_moa.errors import OutputBusy, RunInterrupted, RunStopped

__all__ = [
    "InputRow",
    "OutputBusy",
    "RunInterrupted",
    "RunStopped",
    "RunSummary",
    "agenerate",
    "alabel",
    "check_policy_options",
    "check_system",
    "content_id",
    "generate",
    "label",
    "parse_shard",
    "read_rows",
    "run_rows",
]

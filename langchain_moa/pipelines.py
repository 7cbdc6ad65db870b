"""Compatibility module: the data pipelines now live in `langchain_moa.data`.

``from langchain_moa.pipelines import generate, label`` keeps working; new code imports
from `langchain_moa.data` (and candidate sampling from `langchain_moa.sampling`).
"""

from langchain_moa.data.dpo import alabel, check_policy_options, label
from langchain_moa.data.hub import check_push_token, upload_to_hub
from langchain_moa.data.output import (
    JsonlAppender,
    check_not_input,
    completed_ids,
    errors_path_for,
    lock_output,
    lock_path_for,
    output_line,
)
from langchain_moa.data.rows import (
    HF_PREFIX,
    InputRow,
    check_system,
    content_id,
    in_shard,
    parse_shard,
    read_rows,
    resolve_input,
)
from langchain_moa.data.runner import CHANGED_REASON, RunSummary, Worker, error_reason, run_rows
from langchain_moa.data.sft import agenerate, generate
from langchain_moa.errors import ConfigError, OutputBusy, RunInterrupted, RunStopped
from langchain_moa.sampling import SAMPLE_TEMPERATURES, sample_candidates

__all__ = [
    "CHANGED_REASON",
    "HF_PREFIX",
    "SAMPLE_TEMPERATURES",
    "ConfigError",
    "InputRow",
    "JsonlAppender",
    "OutputBusy",
    "RunInterrupted",
    "RunStopped",
    "RunSummary",
    "Worker",
    "agenerate",
    "alabel",
    "check_not_input",
    "check_policy_options",
    "check_push_token",
    "check_system",
    "completed_ids",
    "content_id",
    "error_reason",
    "errors_path_for",
    "generate",
    "in_shard",
    "label",
    "lock_output",
    "lock_path_for",
    "output_line",
    "parse_shard",
    "read_rows",
    "resolve_input",
    "run_rows",
    "sample_candidates",
    "upload_to_hub",
]

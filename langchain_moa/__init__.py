"""Mixture-of-Agents for LangChain and LangGraph.

One engine (`MoAEngine`) behind several faces: the `ChatMoA` chat model, the LangGraph
subgraph, the `MoAJudge` ensemble judge and the `moa` CLI.
"""

from langchain_moa.chat_model import ChatMoA
from langchain_moa.engine import MoAEngine, Proposal
from langchain_moa.errors import (
    CallError,
    ConfigError,
    ConstrainedOutputError,
    JudgeError,
    LocalModelNotFoundError,
    MoAError,
    OutputBusy,
    RunInterrupted,
    RunStopped,
)
from langchain_moa.graph import MoAState, build_moa_graph
from langchain_moa.judge import JudgeResult, MoAJudge
from langchain_moa.judge_graph import build_judge_graph, judge_node
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT
from langchain_moa.references import inject_references, text_only_history
from langchain_moa.settings import MoASettings

__all__ = [
    "DEFAULT_AGGREGATOR_PROMPT",
    "CallError",
    "ChatMoA",
    "MoAEngine",
    "ConfigError",
    "ConstrainedOutputError",
    "JudgeError",
    "JudgeResult",
    "LocalModelNotFoundError",
    "MoAError",
    "OutputBusy",
    "RunInterrupted",
    "RunStopped",
    "MoAJudge",
    "MoASettings",
    "MoAState",
    "Proposal",
    "build_judge_graph",
    "build_moa_graph",
    "inject_references",
    "judge_node",
    "text_only_history",
]
__version__ = "0.1.0"

"""Mixture-of-Agents for LangChain and LangGraph.

One engine behind several faces: the `ChatMoA` chat model, the LangGraph subgraph
(`build_moa_graph`), the `MoAJudge` ensemble judge (`judge_node`, `build_judge_graph`), the
data pipelines (`generate`, `label`) and the `moa` CLI. What the guides import is here;
the building blocks (the engine, reference injection, the call layer) stay in their modules.
"""

from langchain_moa.chat_model import ChatMoA
from langchain_moa.data import agenerate, alabel, generate, label
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
from langchain_moa.local import local_chat_model
from langchain_moa.recipes import list_recipes, load_recipe
from langchain_moa.settings import MoASettings

__all__ = [
    # the faces
    "ChatMoA",
    "MoASettings",
    "MoAState",
    "build_moa_graph",
    "JudgeResult",
    "MoAJudge",
    "build_judge_graph",
    "judge_node",
    "agenerate",
    "alabel",
    "generate",
    "label",
    # models and recipes
    "list_recipes",
    "load_recipe",
    "local_chat_model",
    # errors (langchain_moa.errors), by what they mean:
    "ConfigError",  # a setting or input is wrong; nothing was sent
    "LocalModelNotFoundError",
    "OutputBusy",
    "RunStopped",
    "MoAError",  # a run failed: too few drafts, no verdict
    "JudgeError",
    "CallError",  # one model call failed (redacted, one line)
    "ConstrainedOutputError",  # a local model's tool call or JSON did not parse
    "RunInterrupted",  # a pipeline run was cancelled; what was written is kept
]
__version__ = "0.1.0"

"""The judge as LangGraph nodes: reward labeling and best-of-N inside agent graphs.

`judge_node(judge)` reads ``prompt`` (or the conversation in ``messages``) and ``candidates``
from the state and writes ``scores``, ``chosen``, ``rejected`` and ``judge_details`` back.
`build_judge_graph` wires it into a small loop: generate N candidates, judge them, and
regenerate while the best score is below a threshold (bounded), else return the best one.
Candidate sampling is `sampling.sample_steps`, the same code `moa label` uses.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from langchain_moa.errors import ConfigError
from langchain_moa.judge import MoAJudge
from langchain_moa.sampling import sample_steps
from langchain_moa.settings import shown
from langchain_moa.steps import adrive, drive


class JudgeState(TypedDict, total=False):
    """State of the judge graph (and what `judge_node` reads and writes)."""

    prompt: str
    messages: Annotated[list[AnyMessage], add_messages]
    candidates: list[str]
    scores: list[float | None]
    chosen: int
    rejected: int
    judge_details: dict[str, Any]
    attempts: int
    history: Annotated[list[dict[str, Any]], operator.add]
    best: str


def _prompt_of(state: JudgeState) -> Any:
    if state.get("prompt"):
        return state["prompt"]
    messages = [m for m in state.get("messages", []) if m.type in ("human", "system")]
    if not messages:
        raise ValueError("the judge node needs 'prompt' or user 'messages' in the state")
    return messages


def _as_dicts(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    role = {"human": "user", "system": "system", "ai": "assistant"}
    return [{"role": role.get(m.type, "user"), "content": m.content} for m in prompt]


def _update(result: Any, candidates: list[str]) -> dict[str, Any]:
    return {
        "scores": result.scores,
        "chosen": result.chosen,
        "rejected": result.rejected,
        "judge_details": result.details,
        "history": [{"candidates": candidates, "scores": result.scores, "chosen": result.chosen}],
    }


def judge_node(judge: MoAJudge) -> RunnableLambda:
    """A node scoring ``state["candidates"]`` for the state's prompt (sync and async).

    It reads ``prompt`` (or the user and system ``messages``) and ``candidates``, and
    writes ``scores``, ``chosen``, ``rejected`` and ``judge_details``.
    """

    def run(state: JudgeState, config: RunnableConfig) -> dict[str, Any]:
        candidates = list(state.get("candidates") or [])
        return _update(judge.rank(_prompt_of(state), candidates, config), candidates)

    async def arun(state: JudgeState, config: RunnableConfig) -> dict[str, Any]:
        candidates = list(state.get("candidates") or [])
        return _update(await judge.arank(_prompt_of(state), candidates, config), candidates)

    return RunnableLambda(run, afunc=arun, name="judge")


def build_judge_graph(
    judge: MoAJudge,
    generator: Any,
    *,
    n: int = 4,
    threshold: float | None = None,
    max_attempts: int = 3,
    checkpointer: Any = None,
    name: str = "moa_judge",
) -> Any:
    """Generate `n` candidates, judge, regenerate while best < `threshold` (<= max_attempts).

    The final answer is appended to ``messages`` and stored in ``best``.

    Args:
        judge: the `MoAJudge` that scores each round's candidates.
        generator: a chat model (or runnable) sampled `n` times per round.
        n: candidates per round.
        threshold: the best score to accept, on the judge's scale: a win rate in [0, 1]
            (pairwise), a 1-10 rating (pointwise), a mean log-probability (likelihood);
            None accepts the first round.
        max_attempts: rounds at most; the best candidate seen is kept after the last.
        checkpointer: a LangGraph checkpointer, to resume or inspect runs.
        name: the compiled graph's name.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be at least 1, got {shown(n)}")
    if n < 2 and judge.mode == "pairwise":
        raise ConfigError(f"n must be at least 2 for pairwise judging, got {n}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {shown(max_attempts)}")

    def round_of(state: JudgeState, candidates: list[str]) -> dict[str, Any]:
        return {"candidates": candidates, "attempts": state.get("attempts", 0) + 1}

    async def agenerate(state: JudgeState, config: RunnableConfig) -> dict[str, Any]:
        sampling = sample_steps(generator, _as_dicts(_prompt_of(state)), n)
        return round_of(state, await adrive(sampling, config))

    def generate(state: JudgeState, config: RunnableConfig) -> dict[str, Any]:
        sampling = sample_steps(generator, _as_dicts(_prompt_of(state)), n)
        return round_of(state, drive(sampling, config))

    def route(state: JudgeState) -> str:
        best = max(s for s in state["scores"] if s is not None)  # None: nobody rated it
        if threshold is not None and best < threshold and state.get("attempts", 0) < max_attempts:
            return "generate"
        return "finish"

    def finish(state: JudgeState) -> dict[str, Any]:
        best = state["candidates"][state["chosen"]]
        return {"best": best, "messages": [AIMessage(content=best)]}

    builder = StateGraph(JudgeState)
    builder.add_node("generate", RunnableLambda(generate, afunc=agenerate, name="generate"))
    builder.add_node("judge", judge_node(judge))
    builder.add_node("finish", finish)
    builder.add_edge(START, "generate")
    builder.add_edge("generate", "judge")
    builder.add_conditional_edges("judge", route, ["generate", "finish"])
    builder.add_edge("finish", END)
    return builder.compile(checkpointer=checkpointer, name=name)


__all__ = ["JudgeState", "build_judge_graph", "judge_node"]

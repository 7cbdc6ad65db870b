"""Judge node and best-of-N judge graph with fake models."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import START, StateGraph

from langchain_moa.errors import ConfigError
from langchain_moa.judge import MoAJudge
from langchain_moa.judge_graph import JudgeState, build_judge_graph, judge_node
from langchain_moa.testing import ScriptedChatModel


def prefers_longer(messages) -> str:
    body = messages[-1].text
    a = body.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = body.split("[Answer B]\n")[1]
    return "[[A]]" if len(a) > len(b) else "[[B]]"


def test_judge_node_reads_candidates_and_writes_scores() -> None:
    builder = StateGraph(JudgeState)
    builder.add_node(
        "judge", judge_node(MoAJudge(judges=[ScriptedChatModel(reply=prefers_longer)]))
    )
    builder.add_edge(START, "judge")
    graph = builder.compile()
    out = graph.invoke({"prompt": "q", "candidates": ["aa", "a", "aaaa"]})
    assert out["chosen"] == 2 and out["rejected"] == 1
    assert out["scores"] == [0.5, 0.0, 1.0]
    assert out["judge_details"]["mode"] == "pairwise"
    out = asyncio.run(graph.ainvoke({"messages": [HumanMessage("q")], "candidates": ["a", "bb"]}))
    assert out["chosen"] == 1


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_judge_graph_regenerates_below_threshold(how: str) -> None:
    rounds = iter(["x", "y", "z", "best answer by far", "ok", "fine"])
    generator = ScriptedChatModel(reply=lambda m: next(rounds))
    # pointwise: only the long answer is rated highly
    rater = ScriptedChatModel(
        reply=lambda m: "Rating: [[9]]" if "best answer" in m[-1].text else "Rating: [[3]]"
    )
    judge = MoAJudge(judges=[rater], mode="pointwise")
    graph = build_judge_graph(judge, generator, n=3, threshold=8, max_attempts=3)
    state = (
        graph.invoke({"prompt": "q"})
        if how == "invoke"
        else asyncio.run(graph.ainvoke({"prompt": "q"}))
    )
    assert state["attempts"] == 2  # the first round's best (3) was below 8
    assert state["best"] == "best answer by far"
    assert state["messages"][-1].content == "best answer by far"
    assert len(state["history"]) == 2


def test_judge_graph_stops_after_max_attempts() -> None:
    generator = ScriptedChatModel(reply="same")
    judge = MoAJudge(judges=[ScriptedChatModel(reply="Rating: [[2]]")], mode="pointwise")
    graph = build_judge_graph(judge, generator, n=2, threshold=9, max_attempts=2)
    state = graph.invoke({"prompt": "q"})
    assert state["attempts"] == 2 and state["best"] == "same"


def test_bad_graph_arguments() -> None:
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")])
    with pytest.raises(ConfigError, match="n must be at least 2 for pairwise judging, got 1"):
        build_judge_graph(judge, ScriptedChatModel(), n=1)
    with pytest.raises(ConfigError, match="max_attempts must be at least 1, got 0"):
        build_judge_graph(judge, ScriptedChatModel(), max_attempts=0)

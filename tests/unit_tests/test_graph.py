"""Unit tests of the LangGraph MoA subgraph with in-process fake models.

The graph must send exactly what `ChatMoA` sends (both go through `MoAEngine`), so most
request checks compare the recorded requests of two identical sets of fakes, one driven
by `ChatMoA` and one by the graph; one test also spells the expected requests out by hand.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import RetryPolicy

from langchain_moa import ChatMoA, MoAError
from langchain_moa.calls import CallError
from langchain_moa.engine import Proposal
from langchain_moa.graph import (
    DEFAULT_RETRY_POLICY,
    agreement,
    build_moa_graph,
    is_transient_error,
    merge_layer_proposals,
    normalize_answer,
)
from langchain_moa.testing.fakes import ScriptedChatModel
from tests.support import call, llm_runs

INSTR = "Combine these drafts."
ROOT = Path(__file__).resolve().parents[2]
FAST_RETRY = RetryPolicy(
    initial_interval=0.01, backoff_factor=1.0, jitter=False, retry_on=is_transient_error
)


def model(name: str, reply: Any = None, **kw: Any) -> ScriptedChatModel:
    return ScriptedChatModel(
        model_name=name, reply=reply if reply is not None else f"{name} says hi", **kw
    )


def as_pairs(messages: list[BaseMessage]) -> list[tuple[str, Any]]:
    return [(m.type, m.content) for m in messages]


def by_layer(name: str):
    """Layer 1 sees no references; later layers name the layer they saw."""

    def reply(messages: list[BaseMessage]) -> str:
        system = messages[0].text if isinstance(messages[0], SystemMessage) else ""
        if INSTR not in system:
            return f"{name}-L1"
        seen = max(int(part.split("-L")[1][0]) for part in system.split() if "-L" in part)
        return f"{name}-L{seen + 1}"

    return reply


async def run_graph(graph: Any, inputs: Any, how: str, config: dict | None = None) -> Any:
    if how == "invoke":
        return graph.invoke(inputs, config)
    return await graph.ainvoke(inputs, config)


HOWS = ["invoke", "ainvoke"]


# ---------------------------------------------------------- same requests as ChatMoA


def fakes(n: int) -> tuple[list[ScriptedChatModel], ScriptedChatModel]:
    names = "abcd"[:n]
    return [model(x, by_layer(x), input_tokens=3 + i) for i, x in enumerate(names)], model(
        "agg", "the final answer", input_tokens=50, output_tokens=9
    )


CONVERSATIONS = {
    "no-system": [HumanMessage("What is MoA?", id="h1")],
    "system": [
        SystemMessage("Be brief.", id="s1"),
        HumanMessage("first question", id="h1"),
        AIMessage("earlier final answer", id="a1"),
        HumanMessage("follow-up", id="h2"),
    ],
}


def without_latency(meta: dict) -> dict:
    layers = [
        {**layer, "proposals": [{**p, "latency_s": 0} for p in layer["proposals"]]}
        for layer in meta["layers"]
    ]
    return {**meta, "layers": layers, "aggregator": {**meta["aggregator"], "latency_s": 0}}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("layers", [1, 2, 3])
async def test_requests_are_identical_to_chat_moa(layers: int, conversation: str, how: str) -> None:
    messages = CONVERSATIONS[conversation]
    chat_ps, chat_agg = fakes(3)
    graph_ps, graph_agg = fakes(3)
    chat = ChatMoA(proposers=chat_ps, aggregator=chat_agg, layers=layers, aggregator_prompt=INSTR)
    graph = build_moa_graph(graph_ps, graph_agg, layers=layers, aggregator_prompt=INSTR)

    expected = chat.invoke(messages) if how == "invoke" else await chat.ainvoke(messages)
    state = await run_graph(graph, {"messages": messages}, how)

    for chat_p, graph_p in zip(chat_ps, graph_ps, strict=True):
        assert len(graph_p.calls) == layers - 1
        assert graph_p.calls == chat_p.calls
        assert graph_p.call_kwargs == chat_p.call_kwargs
    assert len(graph_agg.calls) == 1
    assert graph_agg.calls == chat_agg.calls
    assert graph_agg.call_kwargs == chat_agg.call_kwargs

    answer = state["messages"][-1]
    assert state["messages"][:-1] == messages
    assert answer.content == expected.content == "the final answer"
    assert answer.usage_metadata == expected.usage_metadata
    assert answer.response_metadata["model_name"] == expected.response_metadata["model_name"]
    assert without_latency(answer.response_metadata["moa"]) == without_latency(
        expected.response_metadata["moa"]
    )


async def test_requests_written_out_for_three_layers_with_system_message() -> None:
    ps = [model("a", by_layer("a")), model("b", by_layer("b"))]
    agg = model("agg", "final")
    graph = build_moa_graph(ps, agg, layers=3, aggregator_prompt=INSTR)
    conversation = CONVERSATIONS["system"]
    graph.invoke({"messages": conversation})
    history = [("human", "first question"), ("ai", "earlier final answer"), ("human", "follow-up")]
    for p in ps:
        assert as_pairs(p.calls[0]) == [("system", "Be brief."), *history]
        assert as_pairs(p.calls[1]) == [
            ("system", "Be brief.\n\nCombine these drafts.\n1. a-L1\n2. b-L1"),
            *history,
        ]
    assert as_pairs(agg.calls[0]) == [
        ("system", "Be brief.\n\nCombine these drafts.\n1. a-L2\n2. b-L2"),
        *history,
    ]
    assert conversation[0].content == "Be brief."  # the caller's message is untouched


# ------------------------------------------------------------------------ routing


@pytest.mark.parametrize("how", HOWS)
async def test_one_layer_goes_straight_to_the_aggregator(how: str) -> None:
    p, agg = model("p"), model("agg", "solo")
    graph = build_moa_graph([p], agg, layers=1)
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert state["messages"][-1].content == "solo"
    assert p.calls == []
    assert as_pairs(agg.calls[0]) == [("human", "q")]
    assert state["moa_layers"] == [] and state["moa_layer"] == 0
    assert state["messages"][-1].response_metadata["moa"]["layers"] == []


def test_layers_one_needs_no_proposers() -> None:
    graph = build_moa_graph(aggregator=model("agg", "solo"), layers=1)
    assert graph.invoke({"messages": [HumanMessage("q")]})["messages"][-1].content == "solo"


@pytest.mark.parametrize("how", HOWS)
async def test_each_proposer_layer_routes_to_the_next_then_the_aggregator(how: str) -> None:
    ps = [model("a", by_layer("a")), model("b", by_layer("b"))]
    graph = build_moa_graph(ps, model("agg"), layers=4, aggregator_prompt=INSTR)
    chunks = []
    if how == "invoke":
        chunks = list(graph.stream({"messages": [HumanMessage("q")]}, stream_mode="updates"))
    else:
        chunks = [
            c async for c in graph.astream({"messages": [HumanMessage("q")]}, stream_mode="updates")
        ]
    steps = [next(iter(c)) for c in chunks]
    assert steps == ["prepare", *(["proposer", "proposer", "collect"] * 3), "aggregator"]
    collects = [c["collect"] for c in chunks if "collect" in c]
    assert [c["moa_layer"] for c in collects] == [1, 2, 3]
    assert [[p.answer for p in c["moa_layers"][0]] for c in collects] == [
        ["a-L1", "b-L1"],
        ["a-L2", "b-L2"],
        ["a-L3", "b-L3"],
    ]


@pytest.mark.parametrize("how", HOWS)
async def test_quorum_failure_is_a_clear_error_naming_the_failed(how: str) -> None:
    ps = [
        model("ok", "fine"),
        model("bad1", fail_always=True, error=ValueError("bad request")),
        model("bad2", "   "),
    ]
    agg = model("agg")
    graph = build_moa_graph(ps, agg, layers=2, min_proposers=2, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": f"quorum-{how}"}}
    with pytest.raises(MoAError) as info:
        await run_graph(graph, {"messages": [HumanMessage("q")]}, how, config)
    text = str(info.value)
    assert "only 1 of 3 proposers answered in layer 1 (min_proposers=2)" in text
    assert "proposer 2 (bad1): ValueError: bad request" in text
    assert "proposer 3 (bad2): empty answer" in text
    assert [f.model for f in info.value.failures] == ["bad1", "bad2"]
    assert agg.calls == []
    # the failed layer is recorded in the state for inspection
    state = graph.get_state(config)
    assert state.next == ("quorum_failed",)
    assert state.values["moa_error"] == text
    assert [p.model for p in state.values["moa_layers"][0]] == ["ok", "bad1", "bad2"]


def test_quorum_failure_in_a_later_layer_stops_before_the_next_layer() -> None:
    def fine_then_broken(messages: list[BaseMessage]) -> str:
        if INSTR in messages[0].text:
            raise ValueError("broken in layer 2")
        return "flaky-L1"

    flaky = model("flaky", fine_then_broken)
    ps = [model("a", by_layer("a")), flaky]
    graph = build_moa_graph(ps, model("agg"), layers=4, min_proposers=2, aggregator_prompt=INSTR)
    with pytest.raises(MoAError, match="only 1 of 2 proposers answered in layer 2"):
        graph.invoke({"messages": [HumanMessage("q")]})
    assert len(ps[0].calls) == 2 and len(flaky.calls) == 2  # no layer 3


# --------------------------------------------------------------------- early stop


def test_normalize_answer_and_agreement() -> None:
    assert normalize_answer("  The  answer\nis Paris!! ") == "the answer is paris"
    assert normalize_answer("42.") == normalize_answer("42") == "42"
    assert normalize_answer("ÉTÉ…") == "été"
    assert agreement(["Paris.", "  paris", "PARIS!"])
    assert not agreement(["Paris", "Lyon"])
    assert not agreement(["Paris"])  # one answer is nobody agreeing
    assert not agreement([])


@pytest.mark.parametrize("how", HOWS)
async def test_agreement_skips_the_remaining_proposer_layers(how: str) -> None:
    ps = [model("a", "Paris."), model("b", "  paris"), model("c", fail_always=True)]
    agg = model("agg", "Paris")
    graph = build_moa_graph(ps, agg, layers=4, early_stop="agreement", aggregator_prompt=INSTR)
    state = await run_graph(graph, {"messages": [HumanMessage("Capital of France?")]}, how)
    assert [len(p.calls) for p in ps] == [1, 1, 1]
    assert len(state["moa_layers"]) == 1
    assert agg.calls[0][0].content == "Combine these drafts.\n1. Paris.\n2. paris"
    meta = state["messages"][-1].response_metadata["moa"]
    assert len(meta["layers"]) == 1


def test_disagreement_runs_every_layer() -> None:
    ps = [model("a", "Paris"), model("b", "Lyon")]
    graph = build_moa_graph(ps, model("agg"), layers=3, early_stop="agreement")
    graph.invoke({"messages": [HumanMessage("q")]})
    assert [len(p.calls) for p in ps] == [2, 2]


def test_custom_predicate_sees_the_layer_answers_in_proposer_order() -> None:
    seen: list[list[str]] = []

    def judge_says_good_enough(answers: list[str]) -> bool:
        seen.append(answers)
        return any(a.endswith("-L2") for a in answers)

    ps = [model("slow", by_layer("slow"), delay=0.05), model("fast", by_layer("fast"))]
    graph = build_moa_graph(
        ps, model("agg"), layers=5, early_stop=judge_says_good_enough, aggregator_prompt=INSTR
    )
    state = graph.invoke({"messages": [HumanMessage("q")]})
    assert seen == [["slow-L1", "fast-L1"], ["slow-L2", "fast-L2"]]
    assert len(state["moa_layers"]) == 2
    assert [len(p.calls) for p in ps] == [2, 2]


def test_bad_early_stop_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="early_stop must be None, 'agreement'"):
        build_moa_graph([model("a")], model("agg"), early_stop="consensus")  # type: ignore[arg-type]


# ------------------------------------------------------------------ state contents


def test_reducer_keeps_proposer_order_and_resets_per_layer() -> None:
    def prop(layer: int, i: int) -> Proposal:
        return Proposal(layer=layer, proposer=i, model=f"m{i}", answer=f"{layer}/{i}")

    state = merge_layer_proposals([], [prop(1, 2)])
    state = merge_layer_proposals(state, [prop(1, 0)])
    state = merge_layer_proposals(state, [prop(1, 1)])
    assert [p.proposer for p in state] == [0, 1, 2]
    state = merge_layer_proposals(state, [prop(2, 1)])
    assert [(p.layer, p.proposer) for p in state] == [(2, 1)]
    assert merge_layer_proposals(None, None) == []


@pytest.mark.parametrize("how", HOWS)
async def test_state_holds_layers_in_proposer_order_with_failures_and_usage(how: str) -> None:
    ps = [
        model("slow", "slow answer", delay=0.2, input_tokens=10, output_tokens=5),
        model("broken", fail_always=True, error=PermissionError("no access")),
        model("fast", "fast answer", input_tokens=10, output_tokens=5),
    ]
    agg = model("agg", "final", input_tokens=100, output_tokens=7)
    graph = build_moa_graph(ps, agg, layers=3, aggregator_prompt=INSTR)
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert state["moa_layer"] == 2
    for layer, proposals in enumerate(state["moa_layers"], 1):
        assert [(p.layer, p.proposer, p.model) for p in proposals] == [
            (layer, 0, "slow"),
            (layer, 1, "broken"),
            (layer, 2, "fast"),
        ]
        assert proposals[1].error == "PermissionError: no access" and not proposals[1].ok
    assert state["moa_proposals"] == state["moa_layers"][-1]
    assert agg.calls[0][0].content == "Combine these drafts.\n1. slow answer\n2. fast answer"
    total = {"input_tokens": 40 + 100, "output_tokens": 20 + 7, "total_tokens": 60 + 107}
    assert state["moa_usage"] == total
    assert state["messages"][-1].usage_metadata == total
    assert state["moa_error"] is None


def test_drafts_never_reach_messages() -> None:
    ps = [model("a", "DRAFT-A"), model("b", "DRAFT-B")]
    graph = build_moa_graph(ps, model("agg", "final"), layers=3)
    state = graph.invoke({"messages": [HumanMessage("q")]})
    assert as_pairs(state["messages"]) == [("human", "q"), ("ai", "final")]


def test_a_thread_invoked_again_starts_a_fresh_run() -> None:
    ps = [model("a", "x"), model("b", "y")]
    agg = model("agg", lambda msgs: f"answer {sum(isinstance(m, HumanMessage) for m in msgs)}")
    graph = build_moa_graph(ps, agg, layers=3, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "multi-turn"}}
    graph.invoke({"messages": [HumanMessage("one")]}, config)
    state = graph.invoke({"messages": [HumanMessage("two")]}, config)
    assert len(state["moa_layers"]) == 2  # not 4: the moa_* keys were reset on entry
    assert as_pairs(state["messages"]) == [
        ("human", "one"),
        ("ai", "answer 1"),
        ("human", "two"),
        ("ai", "answer 2"),
    ]
    assert as_pairs(ps[0].calls[2]) == as_pairs(state["messages"][:3])


# -------------------------------------------------------------- inside a parent graph


class ParentState(MessagesState):
    note: str


def parent_with(moa_graph: Any, checkpointer: Any = None) -> Any:
    builder = StateGraph(ParentState)
    builder.add_node("moa", moa_graph)
    builder.add_edge(START, "moa")
    return builder.compile(checkpointer=checkpointer)


@pytest.mark.parametrize("how", HOWS)
async def test_parent_graph_gets_exactly_one_new_message(how: str) -> None:
    ps = [model("a", "DRAFT-A"), model("b", "DRAFT-B")]
    parent = parent_with(build_moa_graph(ps, model("agg", "final"), layers=3))
    history = [HumanMessage("hi", id="h1"), AIMessage("hello", id="a1"), HumanMessage("q", id="h2")]
    out = await run_graph(parent, {"messages": history, "note": "keep me"}, how)
    assert out["note"] == "keep me"
    assert set(out) == {"messages", "note"}
    assert out["messages"][:3] == history
    assert len(out["messages"]) == 4
    answer = out["messages"][3]
    assert isinstance(answer, AIMessage) and answer.content == "final"
    assert [p["answer"] for p in answer.response_metadata["moa"]["layers"][1]["proposals"]] == [
        "DRAFT-A",
        "DRAFT-B",
    ]
    assert as_pairs(ps[0].calls[0]) == as_pairs(history)


def test_multi_turn_in_a_parent_answers_the_whole_conversation() -> None:
    agg = model("agg", lambda msgs: f"turn {sum(isinstance(m, HumanMessage) for m in msgs)}")
    parent = parent_with(build_moa_graph([model("a")], agg), InMemorySaver())
    config = {"configurable": {"thread_id": "parent-multi-turn"}}
    parent.invoke({"messages": [HumanMessage("one")], "note": "n"}, config)
    out = parent.invoke({"messages": [HumanMessage("two")]}, config)
    assert as_pairs(out["messages"]) == [
        ("human", "one"),
        ("ai", "turn 1"),
        ("human", "two"),
        ("ai", "turn 2"),
    ]
    assert as_pairs(agg.calls[1])[1:] == [("human", "one"), ("ai", "turn 1"), ("human", "two")]


def test_inner_state_is_visible_with_subgraphs() -> None:
    ps = [model("a", "x"), model("b", "y")]
    parent = parent_with(build_moa_graph(ps, model("agg", "final"), layers=3))
    events = list(
        parent.stream(
            {"messages": [HumanMessage("q")], "note": "n"}, stream_mode="updates", subgraphs=True
        )
    )
    inner = [(ns, chunk) for ns, chunk in events if ns]
    assert {ns[0].split(":")[0] for ns, _ in inner} == {"moa"}
    assert [next(iter(chunk)) for _, chunk in inner] == [
        "prepare",
        *(["proposer", "proposer", "collect"] * 2),
        "aggregator",
    ]
    last_collect = [chunk["collect"] for _, chunk in inner if "collect" in chunk][-1]
    assert [p.answer for p in last_collect["moa_layers"][0]] == ["x", "y"]
    assert [next(iter(chunk)) for ns, chunk in events if not ns] == ["moa"]


def test_get_state_with_subgraphs_shows_the_moa_state_after_a_failure() -> None:
    ps = [model("a", "x"), model("b", "y")]
    agg = model("agg", "final", fail_times=1)
    parent = parent_with(build_moa_graph(ps, agg, layers=3), InMemorySaver())
    config = {"configurable": {"thread_id": "get-state"}}
    with pytest.raises(RuntimeError, match="scripted failure"):
        parent.invoke({"messages": [HumanMessage("q")], "note": "n"}, config)
    snapshot = parent.get_state(config, subgraphs=True)
    inner = snapshot.tasks[0].state
    assert inner.next == ("aggregator",)
    assert [[p.answer for p in layer] for layer in inner.values["moa_layers"]] == [
        ["x", "y"],
        ["x", "y"],
    ]
    out = parent.invoke(None, config)
    assert out["messages"][-1].content == "final"
    assert [len(p.calls) for p in ps] == [2, 2]


# --------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("how", HOWS)
async def test_proposers_of_a_layer_run_concurrently(how: str) -> None:
    ps = [model(n, delay=0.3) for n in "abcd"]
    graph = build_moa_graph(ps, model("agg"), layers=2)
    started = time.perf_counter()
    await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    # four 0.3 s proposers one after another would take 1.2 s
    assert time.perf_counter() - started < 0.8


# ------------------------------------------------------------------------ retries


def status_error(cls: type[openai.APIStatusError], status: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "https://api.example.com/v1/chat/completions")
    return cls("rejected", response=httpx.Response(status, request=request), body=None)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (status_error(openai.AuthenticationError, 401), False),
        (status_error(openai.PermissionDeniedError, 403), False),
        (status_error(openai.NotFoundError, 404), False),
        (status_error(openai.BadRequestError, 400), False),
        (status_error(openai.RateLimitError, 429), True),
        (status_error(openai.InternalServerError, 500), True),
        (status_error(openai.APIStatusError, 503), True),
        (openai.APIConnectionError(request=httpx.Request("POST", "https://x")), True),
        (openai.APITimeoutError(request=httpx.Request("POST", "https://x")), True),
        (httpx.ConnectError("refused"), True),
        (ConnectionResetError("reset"), True),
        (TimeoutError("read timed out"), True),
        (ValueError("bad"), False),
        (TypeError("bad"), False),
        (RuntimeError("unknown"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_transient_errors_are_told_apart(exc: Exception, transient: bool) -> None:
    assert is_transient_error(exc) is transient


@pytest.mark.parametrize("how", HOWS)
async def test_transient_error_is_retried_then_succeeds(how: str) -> None:
    flaky = model("flaky", "recovered", fail_times=2, error=ConnectionError("connection reset"))
    ps = [model("a", "steady"), flaky]
    agg = model("agg", "final")
    graph = build_moa_graph(ps, agg, layers=2, retry_policy=FAST_RETRY, aggregator_prompt=INSTR)
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert len(flaky.calls) == 3 and len(ps[0].calls) == 1
    assert [p.answer for p in state["moa_layers"][0]] == ["steady", "recovered"]
    assert agg.calls[0][0].content == "Combine these drafts.\n1. steady\n2. recovered"


@pytest.mark.parametrize("how", HOWS)
async def test_auth_error_is_not_retried_and_the_proposer_is_dropped(how: str) -> None:
    denied = model("denied", fail_always=True, error=status_error(openai.AuthenticationError, 401))
    ps = [model("a", "steady"), denied]
    agg = model("agg", "final")
    graph = build_moa_graph(ps, agg, layers=2, retry_policy=FAST_RETRY, aggregator_prompt=INSTR)
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert len(denied.calls) == 1
    dropped = state["moa_layers"][0][1]
    assert dropped.error == "AuthenticationError: rejected" and dropped.answer is None
    assert agg.calls[0][0].content == "Combine these drafts.\n1. steady"


@pytest.mark.parametrize("how", HOWS)
async def test_transient_error_after_the_last_attempt_is_dropped(how: str) -> None:
    down = model("down", fail_always=True, error=ConnectionError("host unreachable"))
    ps = [model("a", "steady"), down]
    policy = FAST_RETRY._replace(max_attempts=2)
    graph = build_moa_graph(ps, model("agg"), layers=2, retry_policy=policy)
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert len(down.calls) == 2
    assert state["moa_layers"][0][1].error == "ConnectionError: host unreachable"


def test_default_policy_retries_transient_errors_only() -> None:
    assert DEFAULT_RETRY_POLICY.max_attempts == 3
    assert DEFAULT_RETRY_POLICY.retry_on is is_transient_error
    broken = model("broken", fail_always=True)  # RuntimeError: not transient
    graph = build_moa_graph([model("a"), broken], model("agg"), layers=2)
    graph.invoke({"messages": [HumanMessage("q")]})
    assert len(broken.calls) == 1


@pytest.mark.parametrize("how", HOWS)
async def test_proposer_timeout_drops_without_retrying(how: str) -> None:
    sleepy = model("sleepy", "late", delay=1.0)
    ps = [model("quick", "quick"), sleepy]
    graph = build_moa_graph(
        ps, model("agg"), layers=2, proposer_timeout=0.2, retry_policy=FAST_RETRY
    )
    started = time.perf_counter()
    state = await run_graph(graph, {"messages": [HumanMessage("q")]}, how)
    assert time.perf_counter() - started < 0.9
    assert len(sleepy.calls) == 1
    assert state["moa_layers"][0][1].error.startswith("TimeoutError: no answer within 0.2 s")


def test_aggregator_retries_transient_errors_but_never_falls_back_to_a_draft() -> None:
    agg = model("agg", "final", fail_times=1, error=ConnectionError("blip"))
    graph = build_moa_graph([model("a", "draft")], agg, retry_policy=FAST_RETRY)
    assert graph.invoke({"messages": [HumanMessage("q")]})["messages"][-1].content == "final"
    assert len(agg.calls) == 2
    down = model("agg", fail_always=True, error=ValueError("aggregator rejects"))
    graph = build_moa_graph([model("a", "draft")], down, retry_policy=FAST_RETRY)
    with pytest.raises(CallError, match=r"^aggregator \(agg\): ValueError: aggregator rejects"):
        graph.invoke({"messages": [HumanMessage("q")]})


# ------------------------------------------------------------------- checkpointing


def sqlite_saver() -> SqliteSaver:
    return SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))


# SqliteSaver is sync-only; AsyncSqliteSaver has its own test below.
@pytest.mark.parametrize(
    ("saver", "how"), [("memory", "invoke"), ("memory", "ainvoke"), ("sqlite", "invoke")]
)
async def test_resume_after_aggregator_failure_skips_finished_layers(saver: str, how: str) -> None:
    ps = [model("a", by_layer("a")), model("b", by_layer("b"))]
    agg = model("agg", "final", fail_times=1)
    checkpointer = InMemorySaver() if saver == "memory" else sqlite_saver()
    graph = build_moa_graph(ps, agg, layers=3, checkpointer=checkpointer, aggregator_prompt=INSTR)
    config = {"configurable": {"thread_id": f"resume-{saver}-{how}"}}
    with pytest.raises(RuntimeError, match="scripted failure"):
        await run_graph(graph, {"messages": [HumanMessage("q")]}, how, config)
    assert [len(p.calls) for p in ps] == [2, 2]
    assert graph.get_state(config).next == ("aggregator",)

    state = await run_graph(graph, None, how, config)
    assert [len(p.calls) for p in ps] == [2, 2]  # the proposer layers did not run again
    assert len(agg.calls) == 2 and agg.calls[1] == agg.calls[0]
    assert as_pairs(state["messages"]) == [("human", "q"), ("ai", "final")]
    meta = state["messages"][-1].response_metadata["moa"]
    assert [[p["answer"] for p in layer["proposals"]] for layer in meta["layers"]] == [
        ["a-L1", "b-L1"],
        ["a-L2", "b-L2"],
    ]


async def test_resume_with_async_sqlite_saver() -> None:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    ps = [model("a", "x"), model("b", "y")]
    agg = model("agg", "final", fail_times=1)
    async with AsyncSqliteSaver.from_conn_string(":memory:") as saver:
        graph = build_moa_graph(ps, agg, layers=2, checkpointer=saver)
        config = {"configurable": {"thread_id": "aio-sqlite"}}
        with pytest.raises(RuntimeError):
            await graph.ainvoke({"messages": [HumanMessage("q")]}, config)
        state = await graph.ainvoke(None, config)
    assert state["messages"][-1].content == "final"
    assert [len(p.calls) for p in ps] == [1, 1]


def test_interrupt_before_the_aggregator_resumes_without_rerunning_proposers() -> None:
    ps = [model("a", "x"), model("b", "y")]
    agg = model("agg", "final")
    graph = build_moa_graph(
        ps, agg, layers=3, checkpointer=InMemorySaver(), interrupt_before=["aggregator"]
    )
    config = {"configurable": {"thread_id": "interrupt"}}
    graph.invoke({"messages": [HumanMessage("q")]}, config)
    assert agg.calls == [] and graph.get_state(config).next == ("aggregator",)
    state = graph.invoke(None, config)
    assert state["messages"][-1].content == "final"
    assert [len(p.calls) for p in ps] == [2, 2]


def test_proposals_survive_strict_checkpoint_deserialization(tmp_path: Path) -> None:
    """With LANGGRAPH_STRICT_MSGPACK (the future default) `Proposal` is still allowed.

    The flag is read when LangGraph is imported, hence a subprocess.
    """
    script = tmp_path / "strict.py"
    script.write_text(
        textwrap.dedent(
            """
            import sqlite3
            from langchain_core.messages import HumanMessage
            from langgraph.checkpoint.sqlite import SqliteSaver
            from langchain_moa.graph import build_moa_graph
            from langchain_moa.testing.fakes import ScriptedChatModel as M

            saver = SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
            ps = [M(model_name="a", reply="x"), M(model_name="b", reply="y")]
            agg = M(model_name="agg", reply="final", fail_times=1)
            graph = build_moa_graph(ps, agg, layers=3, checkpointer=saver)
            config = {"configurable": {"thread_id": "t"}}
            try:
                graph.invoke({"messages": [HumanMessage("q")]}, config)
            except RuntimeError:
                pass
            state = graph.invoke(None, config)
            assert type(state["moa_layers"][0][0]).__name__ == "Proposal", state
            assert state["messages"][-1].content == "final"
            assert [len(p.calls) for p in ps] == [2, 2]
            print("ok")
            """
        )
    )
    env = {**os.environ, "LANGGRAPH_STRICT_MSGPACK": "true"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "blocked" not in result.stderr.lower()
    assert "unregistered type" not in result.stderr


# ---------------------------------------------------------------------- streaming


def streaming_parent() -> tuple[Any, list[ScriptedChatModel]]:
    ps = [model("a", "DRAFT-A words"), model("b", "DRAFT-B words")]
    agg = model("agg", "the final answer")
    return parent_with(build_moa_graph(ps, agg, layers=3)), ps


@pytest.mark.parametrize("how", ["stream", "astream"])
async def test_message_stream_with_subgraphs_shows_only_aggregator_tokens(how: str) -> None:
    parent, _ = streaming_parent()
    inputs = {"messages": [HumanMessage("q")], "note": "n"}
    events = await call(parent, inputs, how, stream_mode="messages", subgraphs=True)
    pieces = [(chunk, meta) for _ns, (chunk, meta) in events]
    assert {meta["langgraph_node"] for _chunk, meta in pieces} == {"aggregator"}
    assert [chunk.content for chunk, _ in pieces if chunk.content] == ["the ", "final ", "answer"]
    assert all("DRAFT" not in str(chunk.content) for chunk, _ in pieces)


@pytest.mark.parametrize("how", ["stream", "astream"])
async def test_message_stream_without_subgraphs_shows_the_answer_once(how: str) -> None:
    parent, _ = streaming_parent()
    inputs = {"messages": [HumanMessage("q")], "note": "n"}
    events = await call(parent, inputs, how, stream_mode="messages")
    assert [chunk.content for chunk, _meta in events] == ["the final answer"]


def test_runs_carry_the_engine_tags() -> None:
    collector = RunCollectorCallbackHandler()
    graph = build_moa_graph([model("a"), model("b")], model("agg"), layers=2)
    graph.invoke({"messages": [HumanMessage("q")]}, {"callbacks": [collector]})
    assert graph.moa_engine.aggregator_tags == ("moa:aggregator",)
    runs = llm_runs(collector)
    proposers = [r for r in runs if "moa:proposer" in (r.tags or [])]
    aggregators = [r for r in runs if "moa:aggregator" in (r.tags or [])]
    assert len(proposers) == 2 and all("nostream" in r.tags for r in proposers)
    assert len(aggregators) == 1 and "nostream" not in aggregators[0].tags


# -------------------------------------------------------------------------- tools


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


CALL = {"name": "multiply", "args": {"a": 6, "b": 7}, "id": "call_1", "type": "tool_call"}


def test_tools_are_bound_to_the_aggregator_like_chat_moa_bind_tools() -> None:
    chat_agg, graph_agg = model("agg", "", tool_calls=[CALL]), model("agg", "", tool_calls=[CALL])
    chat_p, graph_p = model("a", "draft"), model("a", "draft")
    ChatMoA(proposers=[chat_p], aggregator=chat_agg).bind_tools(
        [multiply], tool_choice="multiply"
    ).invoke("6 times 7?")
    graph = build_moa_graph([graph_p], graph_agg, tools=[multiply], tool_choice="multiply")
    state = graph.invoke({"messages": [HumanMessage("6 times 7?")]})
    assert state["messages"][-1].tool_calls == [CALL]
    assert graph_agg.call_kwargs == chat_agg.call_kwargs
    assert graph_p.call_kwargs == chat_p.call_kwargs
    assert "tools" not in graph_p.call_kwargs[0]


def test_tool_choice_without_tools_is_rejected() -> None:
    with pytest.raises(ValueError, match="tool_choice needs tools"):
        build_moa_graph([model("a")], model("agg"), tool_choice="multiply")


class ToolThenAnswer(ScriptedChatModel):
    """Calls the tool until a tool result is in the conversation, then answers."""

    def _answer(self, messages: list[BaseMessage], call_number: int, kwargs: dict) -> AIMessage:
        message = super()._answer(messages, call_number, kwargs)
        if any(isinstance(m, ToolMessage) for m in messages):
            return message.model_copy(update={"tool_calls": []})
        return message


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_example_loops_through_the_tool_node() -> None:
    example = load_example("agent_with_moa.py")
    agg = ToolThenAnswer(
        model_name="agg",
        reply=lambda msgs: "The answer is 42." if isinstance(msgs[-1], ToolMessage) else "",
        tool_calls=[{**CALL, "name": "calculator", "args": {"expression": "6 * 7"}}],
    )
    ps = [model("a", "draft a"), model("b", "draft b")]
    agent = example.build_agent(ps, agg, layers=2)
    out = agent.invoke({"messages": [HumanMessage("What is 6 times 7?")]})
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"]
    assert out["messages"][2].content == "42"
    assert out["messages"][-1].content == "The answer is 42."
    # proposers saw the tool round trip as text
    assert as_pairs(ps[0].calls[1]) == [
        (
            "human",
            "What is 6 times 7?\n\n"
            'The calculator tool was called with {"expression": "6 * 7"} and returned: 42\n'
            "Answer the question using this result.",
        ),
    ]


def test_agent_example_stops_at_the_step_cap() -> None:
    example = load_example("agent_with_moa.py")
    always_tools = model(
        "agg", "done", tool_calls=[{**CALL, "name": "calculator", "args": {"expression": "1+1"}}]
    )
    agent = example.build_agent([model("a")], always_tools, layers=2, max_steps=2)
    out = agent.invoke({"messages": [HumanMessage("loop forever")]})
    kinds = [m.type for m in out["messages"]]
    assert kinds == ["human", "ai", "tool", "ai", "tool", "ai"]
    assert out["messages"][-1].content == "done" and not out["messages"][-1].tool_calls
    # the last answer was asked for without tools, so it had to be text
    assert "tools" not in always_tools.call_kwargs[-1]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 0}, "layers must be at least 1, got 0"),
        ({"layers": 2, "proposers": []}, "layers=2 needs at least one proposer"),
        ({"min_proposers": 3}, "min_proposers=3 is more than the 2 proposers given"),
        ({"proposer_timeout": -1}, "proposer_timeout must be greater than 0, got -1"),
        ({"proposers": ["nosuchprovider:model-x"]}, "proposer 1: cannot create model"),
        ({"aggregator": 42}, "aggregator: expected a BaseChatModel"),
        ({"aggregator": None}, "aggregator is required"),
        ({"retry_policy": ["not a policy"]}, "retry_policy must be a RetryPolicy"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(kwargs: dict, message: str) -> None:
    import re

    base: dict[str, Any] = {"proposers": [model("a"), model("b")], "aggregator": model("agg")}
    base.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_moa_graph(**base)


async def test_empty_conversation_raises() -> None:
    graph = build_moa_graph([model("a")], model("agg"))
    with pytest.raises(ValueError, match="empty conversation"):
        graph.invoke({"messages": []})
    with pytest.raises(ValueError, match="empty conversation"):
        await graph.ainvoke({"messages": []})


def test_string_input_and_graph_name() -> None:
    graph = build_moa_graph([model("a")], model("agg", "ok"), name="my-moa")
    assert graph.name == "my-moa"
    assert graph.invoke({"messages": "just a question"})["messages"][-1].content == "ok"


def test_mermaid_diagram_shows_the_routing() -> None:
    mermaid = build_moa_graph([model("a")], model("agg")).get_graph().draw_mermaid()
    for edge in (
        "__start__ --> prepare;",
        "prepare -.-> proposer;",
        "prepare -.-> aggregator;",
        "proposer --> collect;",
        "collect -.-> proposer;",
        "collect -.-> aggregator;",
        "collect -.-> quorum_failed;",
        "aggregator --> __end__;",
    ):
        assert edge in mermaid

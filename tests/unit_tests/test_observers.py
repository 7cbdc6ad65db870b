"""`calls.observe` hears of every call attempt once, whichever face made it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.types import RetryPolicy

from langchain_moa import ChatMoA, MoAJudge, build_moa_graph
from langchain_moa.calls import CallResult, ModelCall, observe
from langchain_moa.errors import is_transient_error
from langchain_moa.testing.fakes import ScriptedChatModel


class Events:
    """An observer that records (kind, role, ok) of every attempt, from any thread."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, result: CallResult) -> None:
        with self._lock:
            self.seen.append((result.call.kind, result.call.role, result.error is None))

    def sorted(self) -> list[tuple[str, str, bool]]:
        return sorted(self.seen)


def members() -> dict[str, Any]:
    return {
        "proposers": [ScriptedChatModel(reply="a"), ScriptedChatModel(reply="b")],
        "aggregator": ScriptedChatModel(reply="final"),
    }


EXPECTED = [
    ("aggregator", "aggregator", True),
    ("proposer", "proposer 1", True),
    ("proposer", "proposer 2", True),
]


async def _chat_moa(how: str) -> None:
    moa = ChatMoA(**members())
    if how == "invoke":
        moa.invoke("q")
    elif how == "ainvoke":
        await moa.ainvoke("q")
    elif how == "stream":
        list(moa.stream("q"))
    else:
        [chunk async for chunk in moa.astream("q")]


async def _graph(how: str) -> None:
    graph = build_moa_graph(**members())
    state = {"messages": [HumanMessage("q")]}
    if how == "invoke":
        graph.invoke(state)
    elif how == "ainvoke":
        await graph.ainvoke(state)
    elif how == "stream":
        list(graph.stream(state, stream_mode="messages"))
    else:
        [part async for part in graph.astream(state, stream_mode="messages")]


FACES = {"ChatMoA": _chat_moa, "build_moa_graph": _graph}


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
@pytest.mark.parametrize("face", list(FACES))
async def test_the_same_moa_gives_the_same_events_on_every_face(face: str, how: str) -> None:
    events = Events()
    with observe(events):
        await FACES[face](how)
    assert events.sorted() == EXPECTED  # 2 proposers + the aggregator, once each


@pytest.mark.parametrize("how", ["rank", "arank"])
async def test_the_judge_reports_each_of_its_calls_once(how: str) -> None:
    """The judge's MoA shape (2 judges, an aggregator): as many events as calls it makes."""
    judge = MoAJudge(
        judges=[ScriptedChatModel(reply="Rating: [[7]]"), ScriptedChatModel(reply="Rating: [[8]]")],
        aggregator=ScriptedChatModel(reply="Rating: [[8]]"),
        mode="pointwise",
    )
    events = Events()
    with observe(events):
        if how == "rank":
            judge.rank("q", ["answer"])
        else:
            await judge.arank("q", ["answer"])
    assert len(events.seen) == judge.calls_for(1) == len(EXPECTED)
    assert events.sorted() == [
        ("judge", "judge 1", True), ("judge", "judge 2", True),
        ("judge", "judge aggregator", True),
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_a_graph_proposer_reports_every_attempt_once(how: str) -> None:
    flaky = ScriptedChatModel(reply="b", fail_times=2, error=ConnectionError("reset"))
    denied = ScriptedChatModel(fail_always=True)  # RuntimeError: not retried, dropped
    graph = build_moa_graph(
        [ScriptedChatModel(reply="a"), flaky, denied],
        ScriptedChatModel(reply="final"),
        retry_policy=RetryPolicy(
            max_attempts=3, initial_interval=0.01, jitter=False, retry_on=is_transient_error
        ),
    )
    events = Events()
    state = {"messages": [HumanMessage("q")]}
    with observe(events):
        graph.invoke(state) if how == "invoke" else await graph.ainvoke(state)
    assert len(flaky.calls) == 3 and len(denied.calls) == 1
    assert events.sorted() == [
        ("aggregator", "aggregator", True),
        ("proposer", "proposer 1", True),
        ("proposer", "proposer 2", False), ("proposer", "proposer 2", False),
        ("proposer", "proposer 2", True),
        ("proposer", "proposer 3", False),
    ]  # fmt: skip


def test_call_results_are_plain_values() -> None:
    events = Events()
    with observe(events):
        CallResult(ModelCall(ScriptedChatModel(), [], "proposer 1", "proposer"))
    assert events.seen == []

"""Early layer close (`layer_quorum`, `straggler_grace`) and early stop, on every face."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from pydantic import PrivateAttr

from langchain_moa import ChatMoA, ConfigError, build_moa_graph
from langchain_moa.testing.fakes import ScriptedChatModel
from tests.support import PATHS, answer


class CancelAware(ScriptedChatModel):
    """Records whether its async call was cancelled (the straggler's task, not abandoned)."""

    _cancelled: list[bool] = PrivateAttr(default_factory=list)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        try:
            return await super()._agenerate(messages, stop, run_manager, **kw)
        except asyncio.CancelledError:
            self._cancelled.append(True)
            raise


def model(name: str, reply: Any = None, **kw: Any) -> CancelAware:
    return CancelAware(model_name=name, reply=reply if reply is not None else f"{name} draft", **kw)


def fast_and_slow() -> list[CancelAware]:
    return [
        model("a", delay=0.1),
        model("b", delay=0.1),
        model("c", delay=0.1),
        model("slow", delay=5),
    ]


@pytest.mark.parametrize("how", PATHS)
async def test_layer_closes_after_the_quorum_and_records_the_straggler(how: str) -> None:
    ps = fast_and_slow()
    agg = model("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=3, layer_quorum=3, straggler_grace=0.5)
    started = time.perf_counter()
    result = await answer(moa, "q", how)
    assert time.perf_counter() - started < 2  # not the 5 s of the slow proposer, twice
    assert result.content == "final"
    for layer in result.response_metadata["moa"]["layers"]:
        a, b, c, slow = layer["proposals"]
        assert all(p["error"] is None for p in (a, b, c))
        assert slow["error"].startswith("straggler: dropped when the layer closed after 3 answers")
        assert 0.1 <= slow["latency_s"] < 1  # the time it was given: ~0.1 s + 0.5 x 0.1 s
        assert slow["answer"] is None
    # the aggregator saw three drafts, not four
    assert agg.calls[0][0].content.endswith("\n1. a draft\n2. b draft\n3. c draft")
    if how in ("ainvoke", "astream"):
        assert ps[3]._cancelled == [True, True]  # the straggler's task was cancelled


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_a_late_answer_within_the_grace_is_kept(how: str) -> None:
    ps = [model("a", delay=0.05), model("b", delay=0.05), model("late", delay=0.3)]
    moa = ChatMoA(proposers=ps, aggregator=model("agg"), layer_quorum=2, straggler_grace=20)
    result = await answer(moa, "q", how)
    proposals = result.response_metadata["moa"]["layers"][0]["proposals"]
    assert [p["error"] for p in proposals] == [None, None, None]


async def test_default_waits_for_every_proposer() -> None:
    ps = [model("a"), model("b", delay=0.3)]
    result = await answer(ChatMoA(proposers=ps, aggregator=model("agg")), "q", "ainvoke")
    assert all(
        p["error"] is None for p in result.response_metadata["moa"]["layers"][0]["proposals"]
    )


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_the_graph_closes_layers_the_same_way(how: str) -> None:
    ps = fast_and_slow()
    graph = build_moa_graph(
        ps, model("agg", "final"), layers=2, layer_quorum=3, straggler_grace=0.5
    )
    started = time.perf_counter()
    state = {"messages": [HumanMessage("q")]}
    out = graph.invoke(state) if how == "invoke" else await graph.ainvoke(state)
    assert time.perf_counter() - started < 2
    (layer,) = out["moa_layers"]
    assert [p.ok for p in layer] == [True, True, True, False]
    assert layer[3].error.startswith("straggler:")
    meta = out["messages"][-1].response_metadata["moa"]
    assert meta["layers"][0]["proposals"][3]["error"].startswith("straggler:")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_quorum": 0}, "layer_quorum must be an integer from min_proposers (1)"),
        ({"layer_quorum": 3}, "to the number of proposers (2), or None to wait for all; got 3"),
        ({"layer_quorum": 1, "min_proposers": 2}, "from min_proposers (2)"),
        (
            {"layer_quorum": 2, "straggler_grace": -1},
            "straggler_grace must be at least 0, got -1",
        ),
        ({"layer_quorum": 2, "straggler_grace": float("inf")}, "straggler_grace must be a finite"),
        ({"early_stop": "unanimous"}, "early_stop must be None, 'agreement' or a function"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ChatMoA(proposers=[model("a"), model("b")], aggregator=model("agg"), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="layer_quorum|straggler_grace|early_stop"):
        build_moa_graph([model("a"), model("b")], model("agg"), **kwargs)


@pytest.mark.parametrize("how", PATHS)
async def test_agreement_early_stop_skips_the_remaining_layers(how: str) -> None:
    ps = [model("a", "Paris."), model("b", "paris")]
    agg = model("agg", "Paris")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=5, early_stop="agreement")
    result = await answer(moa, "q", how)
    requests = sum(len(p.calls) for p in ps) + len(agg.calls)
    assert requests == 3  # one proposer layer, then the aggregator (13 without early stop)
    meta = result.response_metadata["moa"]
    assert len(meta["layers"]) == 1 and meta["early_stop"] is True


@pytest.mark.parametrize("how", PATHS)
async def test_a_predicate_decides_per_layer(how: str) -> None:
    ps = [model("a", lambda messages: f"v{len(messages)}"), model("b", "x")]
    seen: list[list[str]] = []

    def after_two_layers(answers: list[str]) -> bool:
        seen.append(answers)
        return len(seen) == 2

    moa = ChatMoA(proposers=ps, aggregator=model("agg"), layers=5, early_stop=after_two_layers)
    result = await answer(moa, "q", how)
    assert len(result.response_metadata["moa"]["layers"]) == 2
    assert seen[0] == ["v1", "x"]  # the layer's answers, in proposer order


async def test_without_early_stop_every_layer_runs() -> None:
    ps = [model("a", "same"), model("b", "same")]
    result = await ChatMoA(proposers=ps, aggregator=model("agg"), layers=5).ainvoke("q")
    assert result.response_metadata["moa"]["early_stop"] is False
    assert sum(len(p.calls) for p in ps) == 8


# ------------------------------------------------------------------- placement


@pytest.mark.parametrize("how", PATHS)
async def test_drafts_after_the_conversation_keep_it_a_shared_prefix(how: str) -> None:
    ps = [model("a", "alpha"), model("b", "beta")]
    agg = model("agg", "final")
    moa = ChatMoA(
        proposers=ps,
        aggregator=agg,
        layers=3,
        aggregator_prompt="Drafts:",
        reference_placement="after_conversation",
    )
    conversation = [("system", "Be brief."), ("human", "hi"), ("ai", "hello"), ("human", "q")]
    if how == "invoke":
        moa.invoke(conversation)
    elif how == "ainvoke":
        await moa.ainvoke(conversation)
    elif how == "stream":
        list(moa.stream(conversation))
    else:
        [c async for c in moa.astream(conversation)]
    expected_prefix = [("system", "Be brief."), ("human", "hi"), ("ai", "hello"), ("human", "q")]
    for request in [ps[0].calls[1], agg.calls[0]]:  # layer 2 and the aggregator
        assert [(m.type, m.content) for m in request[:4]] == expected_prefix
        assert (request[4].type, request[4].content) == ("system", "Drafts:\n1. alpha\n2. beta")
        assert len(request) == 5
    assert [(m.type, m.content) for m in ps[0].calls[0]] == expected_prefix  # layer 1 unchanged


def test_unknown_placement_is_a_one_line_error() -> None:
    with pytest.raises(
        ConfigError,
        match="^reference_placement must be 'first_system' or 'after_conversation', got 'end'$",
    ):
        ChatMoA(proposers=[model("a")], aggregator=model("agg"), reference_placement="end")

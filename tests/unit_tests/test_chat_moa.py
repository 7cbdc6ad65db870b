"""Unit tests of ChatMoA and its engine with in-process fake models.

The expected requests are written out by hand from the structure in the project notes
(instruction + "\\n{i}. {answer}" per answer, appended after a blank line to a leading
system message or put first as a new system message), not computed with the code under
test.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, get_usage_metadata_callback
from langchain_core.load import dumps
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

from langchain_moa import ChatMoA, MoAError
from langchain_moa.testing.fakes import ScriptedChatModel
from tests.support import PATHS, call
from tests.support import answer as run

INSTR = "Combine these drafts."


def proposer(name: str, reply: Any = None, **kw: Any) -> ScriptedChatModel:
    return ScriptedChatModel(
        model_name=name, reply=reply if reply is not None else f"{name} says hi", **kw
    )


def as_pairs(messages: list[BaseMessage]) -> list[tuple[str, Any]]:
    return [(m.type, m.content) for m in messages]


@pytest.mark.parametrize("how", PATHS)
async def test_one_layer_is_the_aggregator_alone(how: str) -> None:
    p = proposer("p")
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=[p], aggregator=agg, layers=1, aggregator_prompt=INSTR)
    result = await run(moa, [HumanMessage("q")], how)
    assert result.content == "final"
    assert p.calls == []
    assert as_pairs(agg.calls[0]) == [("human", "q")]


@pytest.mark.parametrize("how", PATHS)
async def test_two_layers_without_system_message(how: str) -> None:
    ps = [proposer("a", "  alpha \n"), proposer("b", "beta"), proposer("c", "gamma")]
    agg = proposer("agg", "final answer")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    conversation = [HumanMessage("What is MoA?")]
    result = await run(moa, conversation, how)

    for p in ps:
        assert len(p.calls) == 1
        assert as_pairs(p.calls[0]) == [("human", "What is MoA?")]
    assert len(agg.calls) == 1
    assert as_pairs(agg.calls[0]) == [
        ("system", "Combine these drafts.\n1. alpha\n2. beta\n3. gamma"),
        ("human", "What is MoA?"),
    ]
    assert result.content == "final answer"
    assert conversation == [HumanMessage("What is MoA?")]


@pytest.mark.parametrize("how", PATHS)
async def test_two_layers_appends_to_existing_system_message(how: str) -> None:
    ps = [proposer("a", "alpha"), proposer("b", "beta")]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    conversation = [SystemMessage("Be brief."), HumanMessage("q")]
    await run(moa, conversation, how)
    for p in ps:
        assert as_pairs(p.calls[0]) == [("system", "Be brief."), ("human", "q")]
    assert as_pairs(agg.calls[0]) == [
        ("system", "Be brief.\n\nCombine these drafts.\n1. alpha\n2. beta"),
        ("human", "q"),
    ]
    # the caller's objects are untouched
    assert conversation[0].content == "Be brief."


def layered_reply(name: str):
    """Answer differently per layer: layer 1 sees no references, layer 2 does."""

    def reply(messages: list[BaseMessage]) -> str:
        has_refs = any(isinstance(m, SystemMessage) and INSTR in m.text for m in messages)
        return f"{name}-L2" if has_refs else f"{name}-L1"

    return reply


@pytest.mark.parametrize("how", PATHS)
async def test_three_layers_inject_only_the_previous_layer(how: str) -> None:
    ps = [proposer("a", layered_reply("a")), proposer("b", layered_reply("b"))]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=3, aggregator_prompt=INSTR)
    conversation = [
        SystemMessage("sys"),
        HumanMessage("first question"),
        AIMessage("earlier final answer"),
        HumanMessage("follow-up"),
    ]
    await run(moa, conversation, how)
    history = [("human", "first question"), ("ai", "earlier final answer"), ("human", "follow-up")]
    for p in ps:
        assert len(p.calls) == 2
        assert as_pairs(p.calls[0]) == [("system", "sys"), *history]
        assert as_pairs(p.calls[1]) == [
            ("system", "sys\n\nCombine these drafts.\n1. a-L1\n2. b-L1"),
            *history,
        ]
    assert as_pairs(agg.calls[0]) == [
        ("system", "sys\n\nCombine these drafts.\n1. a-L2\n2. b-L2"),
        *history,
    ]


async def test_repeated_calls_do_not_stack_system_prompts() -> None:
    ps = [proposer("a", "alpha")]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    conversation = [SystemMessage("sys"), HumanMessage("q")]
    moa.invoke(conversation)
    await moa.ainvoke(conversation)
    assert agg.calls[0] == agg.calls[1]
    assert as_pairs(agg.calls[1])[0] == ("system", "sys\n\nCombine these drafts.\n1. alpha")


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_answers_in_proposer_order_not_completion_order(how: str) -> None:
    ps = [proposer("slow", "slow", delay=0.3), proposer("fast", "fast", delay=0.0)]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    await run(moa, "q", how)
    assert agg.calls[0][0].content == "Combine these drafts.\n1. slow\n2. fast"


def test_braces_in_answers_are_kept_verbatim() -> None:
    ps = [proposer("a", "use {x} and {{y}}")]
    agg = proposer("agg", lambda msgs: msgs[0].text)
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    assert moa.invoke("q").content == "Combine these drafts.\n1. use {x} and {{y}}"


@pytest.mark.parametrize("how", PATHS)
async def test_failed_and_empty_proposers_are_dropped_and_recorded(how: str) -> None:
    ps = [
        proposer("good", "fine"),
        proposer("broken", fail_always=True, error=ConnectionError("server went away")),
        proposer("silent", "   "),
    ]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    result = await run(moa, "q", how)
    assert agg.calls[0][0].content == "Combine these drafts.\n1. fine"
    proposals = result.response_metadata["moa"]["layers"][0]["proposals"]
    assert [p["model"] for p in proposals] == ["good", "broken", "silent"]
    assert proposals[0]["error"] is None and proposals[0]["answer"] == "fine"
    assert proposals[1]["error"] == "ConnectionError: server went away"
    assert proposals[1]["answer"] is None
    assert proposals[2]["error"] == "empty answer"


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
async def test_proposer_timeout_drops_the_slow_one(how: str) -> None:
    ps = [proposer("quick", "quick"), proposer("sleepy", "late", delay=3.0)]
    agg = proposer("agg", "final")
    moa = ChatMoA(
        proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR, proposer_timeout=0.3
    )
    started = time.perf_counter()
    result = await run(moa, "q", how)
    assert time.perf_counter() - started < 2.0
    assert agg.calls[0][0].content == "Combine these drafts.\n1. quick"
    sleepy = result.response_metadata["moa"]["layers"][0]["proposals"][1]
    assert sleepy["error"].startswith("TimeoutError: no answer within 0.3 s")


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
async def test_quorum_failure_names_every_failed_proposer(how: str) -> None:
    ps = [
        proposer("ok", "fine"),
        proposer("bad1", fail_always=True, error=ValueError("bad request")),
        proposer("bad2", fail_always=True, error=TimeoutError("too slow")),
    ]
    agg = proposer("agg", "final")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, min_proposers=2)
    with pytest.raises(MoAError) as info:
        await run(moa, "q", how)
    text = str(info.value)
    assert "only 1 of 3 proposers answered in layer 1 (min_proposers=2)" in text
    assert "proposer 2 (bad1): ValueError: bad request" in text
    assert "proposer 3 (bad2): TimeoutError: too slow" in text
    assert [f.model for f in info.value.failures] == ["bad1", "bad2"]
    assert agg.calls == []


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
async def test_aggregator_failure_raises_instead_of_returning_a_draft(how: str) -> None:
    ps = [proposer("a", "draft")]
    agg = proposer("agg", fail_always=True, error=RuntimeError("aggregator down"))
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2)
    with pytest.raises(RuntimeError, match="aggregator down"):
        await run(moa, "q", how)


@pytest.mark.parametrize("how", PATHS)
async def test_usage_is_summed_over_every_call(how: str) -> None:
    ps = [proposer(n, input_tokens=10, output_tokens=5, delay=0.02) for n in "abc"]
    agg = proposer("agg", "final", input_tokens=100, output_tokens=7)
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=3)
    result = await run(moa, "q", how)
    # 2 proposer layers x 3 proposers x (10 + 5) + aggregator (100 + 7)
    assert result.usage_metadata == {
        "input_tokens": 60 + 100,
        "output_tokens": 30 + 7,
        "total_tokens": 90 + 107,
    }
    meta = result.response_metadata["moa"]
    assert meta["aggregator"]["usage"]["total_tokens"] == 107
    assert all(
        p["usage"]["total_tokens"] == 15 for layer in meta["layers"] for p in layer["proposals"]
    )
    assert result.response_metadata["model_name"] == "agg"
    # each proposer sleeps 0.02 s: its recorded latency covers that call, not the layer's
    assert all(0.02 <= p["latency_s"] < 2 for layer in meta["layers"] for p in layer["proposals"])
    assert 0 < meta["aggregator"]["latency_s"] < 2


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_proposers_of_a_layer_run_concurrently(how: str) -> None:
    ps = [proposer(n, delay=0.4) for n in "abcd"]
    moa = ChatMoA(proposers=ps, aggregator=proposer("agg"), layers=2)
    started = time.perf_counter()
    await run(moa, "q", how)
    # four 0.4 s proposers one after another would take 1.6 s
    assert time.perf_counter() - started < 1.0


def test_stream_yields_aggregator_tokens_then_a_closing_chunk() -> None:
    ps = [proposer("a", "draft")]
    agg = proposer("agg", "one two three")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2)
    chunks = list(moa.stream("q"))
    texts = [c.content for c in chunks]
    assert texts[:3] == ["one ", "two ", "three"]
    assert chunks[-1].chunk_position == "last"
    assert len({c.id for c in chunks}) == 1
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.content == "one two three"
    assert merged.response_metadata["model_name"] == "agg"
    assert merged.response_metadata["moa"]["layers"][0]["proposals"][0]["answer"] == "draft"


# (sync paths and event loops: test_calls.py records the loop and thread each model ran in)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 0}, "layers must be at least 1, got 0"),
        ({"layers": 2, "proposers": []}, "layers=2 needs at least one proposer"),
        ({"min_proposers": 3}, "min_proposers=3 is more than the 2 proposers given"),
        ({"min_proposers": 0}, "min_proposers must be at least 1, got 0"),
        ({"proposer_timeout": -1}, "proposer_timeout must be greater than 0, got -1"),
        ({"proposers": ["nosuchprovider:model-x"]}, "proposer 1: cannot create model"),
        ({"aggregator": 42}, "aggregator: expected a BaseChatModel"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(kwargs: dict, message: str) -> None:
    base: dict[str, Any] = {
        "proposers": [proposer("a"), proposer("b")],
        "aggregator": proposer("agg"),
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        ChatMoA(**base)


def test_single_layer_needs_no_proposers() -> None:
    moa = ChatMoA(aggregator=proposer("agg", "solo"), layers=1)
    assert moa.invoke("q").content == "solo"


async def test_empty_conversation_raises_at_call() -> None:
    moa = ChatMoA(proposers=[proposer("a")], aggregator=proposer("agg"))
    with pytest.raises(ValueError, match="empty conversation"):
        moa.invoke([])
    with pytest.raises(ValueError, match="empty conversation"):
        await moa.ainvoke([])


# ------------------------------------------------------------------------- tools


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_bind_tools_reaches_the_aggregator_only() -> None:
    ps = [proposer("a", "draft")]
    call = {"name": "multiply", "args": {"a": 6, "b": 7}, "id": "call_1", "type": "tool_call"}
    agg = proposer("agg", "", tool_calls=[call])
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2)
    result = moa.bind_tools([multiply], tool_choice="multiply").invoke("6 times 7?")
    assert result.tool_calls == [call]
    assert "tools" not in ps[0].call_kwargs[0]
    tools = agg.call_kwargs[0]["tools"]
    assert tools[0]["function"]["name"] == "multiply"
    assert agg.call_kwargs[0]["tool_choice"] == "multiply"


def test_streamed_tool_calls_are_assembled() -> None:
    call = {"name": "multiply", "args": {"a": 6, "b": 7}, "id": "call_1", "type": "tool_call"}
    moa = ChatMoA(proposers=[proposer("a")], aggregator=proposer("agg", "", tool_calls=[call]))
    chunks = list(moa.bind_tools([multiply]).stream("6 times 7?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.tool_calls == [call]


def test_tool_history_reaches_proposers_as_text_and_aggregator_verbatim() -> None:
    ps = [proposer("a", "draft")]
    agg = proposer("agg", "It is 42.")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2, aggregator_prompt=INSTR)
    history = [
        HumanMessage("6 times 7?"),
        AIMessage(
            "",
            tool_calls=[{"name": "multiply", "args": {"a": 6, "b": 7}, "id": "c1"}],
        ),
        ToolMessage("42", tool_call_id="c1", name="multiply"),
    ]
    moa.bind_tools([multiply]).invoke(history)
    sent = ps[0].calls[0]
    assert as_pairs(sent) == [
        (
            "human",
            "6 times 7?\n\n"
            'The multiply tool was called with {"a": 6, "b": 7} and returned: 42\n'
            "Answer the question using this result.",
        ),
    ]
    assert history[0].content == "6 times 7?"  # the caller's message is untouched
    assert not any(isinstance(m, ToolMessage) for m in sent)
    assert isinstance(agg.calls[0][3], ToolMessage)
    assert agg.calls[0][2].tool_calls[0]["name"] == "multiply"


def test_structured_output_goes_through_the_aggregator() -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        value: int

    call = {"name": "Answer", "args": {"value": 42}, "id": "c1", "type": "tool_call"}
    moa = ChatMoA(proposers=[proposer("a")], aggregator=proposer("agg", "", tool_calls=[call]))
    assert moa.with_structured_output(Answer).invoke("q") == Answer(value=42)


# ----------------------------------------------------------------------- tracing


class RunRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts = 0
        self.usage: list[Any] = []

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.starts += 1

    def on_llm_end(self, response, **kwargs) -> None:
        self.usage.append(response.generations[0][0].message.usage_metadata)


@pytest.mark.parametrize("how", PATHS)
async def test_proposer_and_aggregator_runs_are_traced_as_children(how: str) -> None:
    collector = RunCollectorCallbackHandler()
    moa = ChatMoA(proposers=[proposer("a"), proposer("b")], aggregator=proposer("agg"))
    await call(moa, "q", how, {"callbacks": [collector]})
    assert len(collector.traced_runs) == 1
    root = collector.traced_runs[0]
    assert root.name == "ChatMoA"
    children = root.child_runs
    assert len(children) == 3
    assert sum("moa:proposer" in (r.tags or []) for r in children) == 2
    assert sum("moa:aggregator" in (r.tags or []) for r in children) == 1
    assert all("nostream" in (r.tags or []) for r in children)


@pytest.mark.parametrize("how", PATHS)
async def test_plain_handlers_and_usage_callbacks_count_each_token_once(how: str) -> None:
    recorder = RunRecorder()
    ps = [proposer("a", input_tokens=10, output_tokens=5), proposer("b")]
    moa = ChatMoA(proposers=ps, aggregator=proposer("agg", input_tokens=20, output_tokens=3))
    with get_usage_metadata_callback() as usage_cb:
        await call(moa, "q", how, {"callbacks": [recorder]})
    assert recorder.starts == 1  # one model call from the caller's point of view
    assert recorder.usage[0]["total_tokens"] == 15 + 15 + 23
    totals = list(usage_cb.usage_metadata.values())
    assert len(totals) == 1 and totals[0]["total_tokens"] == 15 + 15 + 23


# ----------------------------------------------------------------------- secrets


def test_api_keys_never_leak() -> None:
    from langchain_openai import ChatOpenAI

    key = "sk-verysecretkey1234567890"
    remote = ChatOpenAI(
        model="gpt-4o-mini", api_key=key, base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=2
    )

    def leak(messages: list[BaseMessage]) -> str:
        raise RuntimeError(f"Incorrect API key provided: {key} rejected")

    failing = proposer("leaky", leak)
    moa = ChatMoA(proposers=[remote, failing, proposer("ok", "fine")], aggregator=proposer("agg"))
    assert key not in repr(moa)
    assert key not in dumps(moa)
    result = moa.invoke("q")
    assert key not in str(result.response_metadata)
    strict = ChatMoA(proposers=[remote, failing], aggregator=proposer("agg"), min_proposers=2)
    with pytest.raises(MoAError) as info:
        strict.invoke("q")
    assert key not in str(info.value)
    assert "leaky" in str(info.value)


# ------------------------------------------------------------- batch and events


def test_batch_and_abatch_answer_every_input() -> None:
    def echo(messages: list[BaseMessage]) -> str:
        return f"draft for {messages[-1].text}"

    agg = proposer("agg", lambda msgs: "final for " + msgs[-1].text)
    moa = ChatMoA(proposers=[proposer("a", echo), proposer("b", echo)], aggregator=agg)
    results = moa.batch(["one", "two", "three"])
    assert [r.content for r in results] == ["final for one", "final for two", "final for three"]
    results = asyncio.run(moa.abatch(["x", "y"]))
    assert [r.content for r in results] == ["final for x", "final for y"]


async def test_astream_events_show_proposers_as_nested_chat_model_runs() -> None:
    moa = ChatMoA(
        proposers=[proposer("a", "alpha"), proposer("b", "beta")],
        aggregator=proposer("agg", "one two"),
    )
    events = [e async for e in moa.astream_events("q", version="v2")]
    starts = [e for e in events if e["event"] == "on_chat_model_start"]
    assert len(starts) == 4  # ChatMoA, two proposers, aggregator
    assert sum("moa:proposer" in e["tags"] for e in starts) == 2
    moa_run = starts[0]["run_id"]
    top_stream = [
        e["data"]["chunk"].content
        for e in events
        if e["event"] == "on_chat_model_stream" and e["run_id"] == moa_run
    ]
    assert "".join(top_stream) == "one two"


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_parent_graph_message_stream_shows_only_the_final_answer(how: str) -> None:
    from langgraph.graph import START, MessagesState, StateGraph

    moa = ChatMoA(
        proposers=[proposer("a", "DRAFT-A words"), proposer("b", "DRAFT-B words")],
        aggregator=proposer("agg", "the final answer"),
    )

    def node(state: MessagesState) -> dict:
        return {"messages": [moa.invoke(state["messages"])]}

    async def anode(state: MessagesState) -> dict:
        return {"messages": [await moa.ainvoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("moa", node if how == "invoke" else anode)
    builder.add_edge(START, "moa")
    graph = builder.compile()
    inputs = {"messages": [HumanMessage("q")]}
    if how == "invoke":
        streamed = [chunk for chunk, _meta in graph.stream(inputs, stream_mode="messages")]
    else:
        streamed = [chunk async for chunk, _meta in graph.astream(inputs, stream_mode="messages")]
    text = "".join(c.content for c in streamed if isinstance(c.content, str))
    assert text == "the final answer"
    assert "DRAFT" not in text

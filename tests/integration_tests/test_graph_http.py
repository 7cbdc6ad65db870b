"""The MoA graph over real HTTP: ChatOpenAI clients against the scripted loopback server.

Embedded in a parent `MessagesState` graph, as users deploy it: the requests on the wire,
the parent's message stream (aggregator tokens only), graph-level retries of real HTTP
errors, and resumption from a checkpoint after the aggregator fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import RetryPolicy

from langchain_moa.calls import CallError
from langchain_moa.graph import build_moa_graph, is_transient_error
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer
from tests.support import call

pytestmark = pytest.mark.http

INSTR = "Merge the drafts below."
FAST_RETRY = RetryPolicy(
    initial_interval=0.01, backoff_factor=1.0, jitter=False, retry_on=is_transient_error
)


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="first DRAFT", latency=0.05),
        "p2": ModelScript(reply="second DRAFT", latency=0.02),
        "agg": ModelScript(reply="the merged answer", latency=0.01, token_delay=0.005),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        yield srv


def moa_graph(server: ScriptedOpenAIServer, names=("p1", "p2"), **kwargs: Any) -> Any:
    # max_retries=0: the SDK's own retries would hide what the graph does.
    kwargs.setdefault("layers", 3)
    return build_moa_graph(
        [server.chat_model(n, max_retries=0) for n in names],
        server.chat_model("agg", max_retries=0),
        aggregator_prompt=INSTR,
        **kwargs,
    )


def parent_of(moa: Any, checkpointer: Any = None) -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("moa", moa)
    builder.add_edge(START, "moa")
    return builder.compile(checkpointer=checkpointer)


def wire(request: Any) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request.messages]


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_parent_graph_appends_one_answer_and_the_wire_follows_moa(
    server: ScriptedOpenAIServer, how: str
) -> None:
    parent = parent_of(moa_graph(server))
    inputs = {"messages": [SystemMessage("Be brief."), HumanMessage("What is MoA?")]}
    out = parent.invoke(inputs) if how == "invoke" else await parent.ainvoke(inputs)
    assert [m.type for m in out["messages"]] == ["system", "human", "ai"]
    answer = out["messages"][-1]
    assert answer.content == "the merged answer"
    assert answer.response_metadata["model_name"] == "agg"
    assert answer.usage_metadata["total_tokens"] > 0

    refs = f"Be brief.\n\n{INSTR}\n1. first DRAFT\n2. second DRAFT"
    for name in ("p1", "p2"):
        first, second = server.requests_for(name)
        assert wire(first) == [("system", "Be brief."), ("user", "What is MoA?")]
        assert wire(second) == [("system", refs), ("user", "What is MoA?")]
    (agg,) = server.requests_for("agg")
    assert wire(agg) == [("system", refs), ("user", "What is MoA?")]
    # both proposers of a layer were in flight together
    first_layer = [server.requests_for(n)[0] for n in ("p1", "p2")]
    assert max(r.started for r in first_layer) < min(r.finished for r in first_layer)


@pytest.mark.parametrize("how", ["stream", "astream"])
async def test_parent_message_stream_has_aggregator_tokens_and_no_drafts(
    server: ScriptedOpenAIServer, how: str
) -> None:
    parent = parent_of(moa_graph(server))
    inputs = {"messages": [HumanMessage("What is MoA?")]}
    events = await call(parent, inputs, how, stream_mode="messages", subgraphs=True)
    chunks = [(chunk, meta) for _ns, (chunk, meta) in events]
    assert {meta["langgraph_node"] for _, meta in chunks} == {"aggregator"}
    texts = [chunk.content for chunk, _ in chunks if chunk.content]
    assert len(texts) > 1  # real token stream, not one block
    assert "".join(texts) == "the merged answer"
    assert all("DRAFT" not in str(chunk.content) for chunk, _ in chunks)
    assert server.requests_for("agg")[0].stream


async def test_resume_after_aggregator_failure_reuses_the_proposer_layers(
    server: ScriptedOpenAIServer,
) -> None:
    # 400: a bad request, which neither the SDK nor the graph retries.
    server.set_script("agg", ModelScript(reply="the merged answer", fail_times=1, fail_status=400))
    parent = parent_of(moa_graph(server), InMemorySaver())
    config = {"configurable": {"thread_id": "http-resume"}}
    with pytest.raises(CallError) as info:
        parent.invoke({"messages": [HumanMessage("What is MoA?")]}, config)
    error = info.value
    assert re.match(
        r"aggregator \(agg\): \w*(BadRequest|InvalidRequest)Error: Error code: 400", str(error)
    )
    assert (error.status_code, error.transient) == (400, False)
    counts = {n: len(server.requests_for(n)) for n in ("p1", "p2", "agg")}
    assert counts == {"p1": 2, "p2": 2, "agg": 1}

    inner = parent.get_state(config, subgraphs=True).tasks[0].state
    assert inner.next == ("aggregator",)
    assert len(inner.values["moa_layers"]) == 2

    out = parent.invoke(None, config)
    assert out["messages"][-1].content == "the merged answer"
    counts = {n: len(server.requests_for(n)) for n in ("p1", "p2", "agg")}
    assert counts == {"p1": 2, "p2": 2, "agg": 2}
    first, second = server.requests_for("agg")
    assert first.messages == second.messages


async def test_http_errors_retried_or_dropped_by_the_proposer_policy(
    server: ScriptedOpenAIServer,
) -> None:
    server.set_script("flaky", ModelScript(reply="flaky but fine", fail_times=1, fail_status=503))
    server.set_script("denied", ModelScript(reply="never", fail_always=True, fail_status=401))
    graph = moa_graph(server, names=("p1", "flaky", "denied"), layers=2, retry_policy=FAST_RETRY)
    state = await graph.ainvoke({"messages": [HumanMessage("q")]})
    assert len(server.requests_for("flaky")) == 2  # 503 retried once
    assert len(server.requests_for("denied")) == 1  # 401 not retried
    first, flaky, denied = state["moa_layers"][0]
    assert (first.answer, flaky.answer, denied.answer) == ("first DRAFT", "flaky but fine", None)
    # langchain-openai raises its subclass OpenAIAuthenticationError
    assert "AuthenticationError: Error code: 401" in denied.error
    (agg,) = server.requests_for("agg")
    assert agg.messages[0]["content"] == f"{INSTR}\n1. first DRAFT\n2. flaky but fine"

"""ChatMoA over real HTTP: ChatOpenAI clients against the scripted loopback server.

The server records every request body, so the structure MoA sends is checked on the wire,
as a provider would receive it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_moa import ChatMoA, MoAError
from langchain_moa.testing import API_KEY, ModelScript, ScriptedOpenAIServer

pytestmark = pytest.mark.http

INSTR = "Merge the drafts below."


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="first draft", latency=0.05),
        "p2": ModelScript(reply="second draft", latency=0.1),
        "p3": ModelScript(reply="third draft", latency=0.02),
        "agg": ModelScript(reply="the merged answer", token_delay=0.001),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        yield srv


def make_moa(server: ScriptedOpenAIServer, **kwargs) -> ChatMoA:
    kwargs.setdefault("layers", 2)
    return ChatMoA(
        proposers=[server.chat_model(n, max_retries=0) for n in ("p1", "p2", "p3")],
        aggregator=server.chat_model("agg", max_retries=0),
        aggregator_prompt=INSTR,
        **kwargs,
    )


def wire(request) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request.messages]


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
async def test_requests_on_the_wire_follow_the_moa_structure(
    server: ScriptedOpenAIServer, how: str
) -> None:
    moa = make_moa(server, layers=3)
    conversation = [
        SystemMessage("Answer in English."),
        HumanMessage("What is a mixture of agents?"),
    ]
    if how == "invoke":
        result = moa.invoke(conversation)
    elif how == "ainvoke":
        result = await moa.ainvoke(conversation)
    elif how == "stream":
        chunks = list(moa.stream(conversation))
        result = sum(chunks[1:], chunks[0])
    else:
        chunks = [c async for c in moa.astream(conversation)]
        result = sum(chunks[1:], chunks[0])
    assert result.content == "the merged answer"

    refs = f"Answer in English.\n\n{INSTR}\n1. first draft\n2. second draft\n3. third draft"
    for name in ("p1", "p2", "p3"):
        first, second = server.requests_for(name)
        assert wire(first) == [
            ("system", "Answer in English."),
            ("user", "What is a mixture of agents?"),
        ]
        assert wire(second) == [("system", refs), ("user", "What is a mixture of agents?")]
        assert first.body.get("tools") is None
    (agg,) = server.requests_for("agg")
    assert wire(agg) == [("system", refs), ("user", "What is a mixture of agents?")]
    assert agg.stream == (how in ("stream", "astream"))
    # usage: every call's tokens, summed
    assert result.usage_metadata["total_tokens"] > 0
    layers = result.response_metadata["moa"]["layers"]
    per_call = sum(p["usage"]["total_tokens"] for layer in layers for p in layer["proposals"])
    agg_usage = result.response_metadata["moa"]["aggregator"]["usage"]["total_tokens"]
    assert result.usage_metadata["total_tokens"] == per_call + agg_usage
    assert result.response_metadata["model_name"] == "agg"


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_proposer_requests_overlap_on_the_wire(
    server: ScriptedOpenAIServer, how: str
) -> None:
    for name in ("p1", "p2", "p3"):
        server.set_script(name, ModelScript(reply=f"{name} draft", latency=0.3))
    moa = make_moa(server)
    if how == "invoke":
        moa.invoke("q")
    else:
        await moa.ainvoke("q")
    proposer_requests = [r for r in server.requests if r.model != "agg"]
    assert len(proposer_requests) == 3
    # each proposer request arrived before any other one finished: they ran concurrently
    last_start = max(r.started for r in proposer_requests)
    first_end = min(r.finished for r in proposer_requests)
    assert last_start < first_end


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
async def test_http_failures_and_timeouts_are_dropped_and_recorded(
    server: ScriptedOpenAIServer, how: str
) -> None:
    server.set_script("p2", ModelScript(fail_always=True, fail_status=500))
    server.set_script("p3", ModelScript(reply="too late", latency=3.0))
    moa = make_moa(server, proposer_timeout=0.5)
    if how == "invoke":
        result = moa.invoke("q")
    elif how == "ainvoke":
        result = await moa.ainvoke("q")
    else:
        chunks = list(moa.stream("q"))
        result = sum(chunks[1:], chunks[0])
    (agg,) = server.requests_for("agg")
    assert agg.messages[0]["content"] == f"{INSTR}\n1. first draft"
    proposals = result.response_metadata["moa"]["layers"][0]["proposals"]
    assert "Error code: 500" in proposals[1]["error"]
    assert proposals[2]["error"].startswith("TimeoutError")


async def test_quorum_error_over_http_names_failures(server: ScriptedOpenAIServer) -> None:
    server.set_script("p1", ModelScript(fail_always=True, fail_status=401))
    server.set_script("p2", ModelScript(empty=True))
    moa = make_moa(server, min_proposers=2)
    with pytest.raises(MoAError) as info:
        await moa.ainvoke("q")
    message = str(info.value)
    assert "proposer 1 (p1): OpenAIAuthenticationError: Error code: 401" in message
    assert "proposer 2 (p2): empty answer" in message
    assert API_KEY not in message
    assert server.requests_for("agg") == []


def test_aggregator_http_failure_raises(server: ScriptedOpenAIServer) -> None:
    server.set_script("agg", ModelScript(fail_always=True, fail_status=503))
    moa = make_moa(server)
    with pytest.raises(Exception, match="scripted failure"):
        moa.invoke("q")


def test_stream_is_the_aggregator_token_stream(server: ScriptedOpenAIServer) -> None:
    server.set_script("agg", ModelScript(reply="alpha beta gamma delta", token_delay=0.01))
    moa = make_moa(server)
    chunks = list(moa.stream("q"))
    texts = [c.content for c in chunks if c.content]
    assert texts == ["alpha ", "beta ", "gamma ", "delta"]
    assert chunks[-1].usage_metadata["total_tokens"] > 0


def test_tool_calls_over_http(server: ScriptedOpenAIServer) -> None:
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    server.set_script("agg", ModelScript())  # smart default: calls the tool
    moa = make_moa(server)
    result = moa.bind_tools([add]).invoke("What is 2 plus 40? Use add.")
    assert result.tool_calls[0]["name"] == "add"
    assert result.tool_calls[0]["args"] == {"a": 2, "b": 40}
    for name in ("p1", "p2", "p3"):
        assert server.requests_for(name)[0].body.get("tools") is None
    assert server.requests_for("agg")[0].tools[0]["function"]["name"] == "add"


def test_api_key_is_not_recorded_or_leaked(server: ScriptedOpenAIServer) -> None:
    moa = make_moa(server)
    result = moa.invoke("q")
    assert API_KEY not in repr(server.requests)
    assert API_KEY not in repr(moa)
    assert API_KEY not in str(result)


def _plain_client(server: ScriptedOpenAIServer, model: str, **kwargs):
    """A ChatOpenAI as users build it for a third-party endpoint: no stream_usage given."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=model, base_url=server.base_url, api_key=API_KEY, max_retries=0, **kwargs
    )


@pytest.mark.parametrize("how", ["stream", "astream", "graph_messages"])
async def test_streamed_usage_counts_the_aggregator_like_invoke(
    server: ScriptedOpenAIServer, how: str
) -> None:
    """ChatOpenAI streams no usage to a custom base_url unless asked: the call layer asks."""
    from langgraph.graph import START, MessagesState, StateGraph

    from langchain_moa import build_moa_graph

    proposers = [_plain_client(server, n) for n in ("p1", "p2")]
    aggregator = _plain_client(server, "agg")
    assert aggregator.stream_usage is None  # the default that used to lose the tokens
    moa = ChatMoA(proposers=proposers, aggregator=aggregator, aggregator_prompt=INSTR)
    expected = moa.invoke("Why is the sky blue?").usage_metadata
    server.reset()
    if how == "stream":
        merged = None
        for chunk in moa.stream("Why is the sky blue?"):
            merged = chunk if merged is None else merged + chunk
        usage = merged.usage_metadata
    elif how == "astream":
        merged = None
        async for chunk in moa.astream("Why is the sky blue?"):
            merged = chunk if merged is None else merged + chunk
        usage = merged.usage_metadata
    else:  # the graph's aggregator is invoked; LangGraph makes it stream for "messages"
        builder = StateGraph(MessagesState)
        builder.add_node("moa", build_moa_graph(proposers, aggregator, aggregator_prompt=INSTR))
        builder.add_edge(START, "moa")
        app = builder.compile()
        inputs = {"messages": [("user", "Why is the sky blue?")]}
        list(app.stream(inputs, stream_mode="messages", subgraphs=True))
        usage = app.invoke(inputs)["messages"][-1].usage_metadata
        (streamed,) = [r for r in server.requests_for("agg") if r.stream]
        assert streamed.body["stream_options"] == {"include_usage": True}
    assert usage == expected
    agg_requests = server.requests_for("agg")
    assert agg_requests and all(
        r.body.get("stream_options") == {"include_usage": True} for r in agg_requests if r.stream
    )


def test_an_explicit_stream_usage_false_is_respected(server: ScriptedOpenAIServer) -> None:
    """Some servers refuse stream_options: a user who said no is not overruled."""
    aggregator = _plain_client(server, "agg", stream_usage=False)
    moa = ChatMoA(proposers=[_plain_client(server, "p1")], aggregator=aggregator)
    list(moa.stream("hi"))
    (request,) = server.requests_for("agg")
    assert request.stream and "stream_options" not in request.body

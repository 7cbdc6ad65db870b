"""The request schema of `moa serve`, fuzzed: thousands of generated bodies, valid-ish and
hostile (wrong types, NaN and infinities, lone surrogates, deep nesting, huge numbers,
nulls, lists where objects go), against the app in-process on fake models.

Whatever comes in, the answer is a deliberate one: 200, or an OpenAI error with a 4xx
status, never a 500 or a 502 (no upstream failed), never a traceback in the log."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import httpx
import pytest

from langchain_moa import ChatMoA
from langchain_moa.server import ServeLimits, create_app
from langchain_moa.testing.fakes import ScriptedChatModel

pytest.importorskip("langserve", reason="the 'serve' extra is not installed")
hypothesis = pytest.importorskip("hypothesis", reason="the 'test' extra is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROUTES = ["/v1/chat/completions", "/moa/invoke", "/moa/batch", "/moa/stream"]

# leaves: every JSON scalar, and what Python's json lets through besides
weird_floats = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324])
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**40, -1, 0])
surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff"])
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), huge_ints, st.floats(), weird_floats,
    st.text(max_size=8), surrogates,
)  # fmt: skip
anything = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def deep(levels: int) -> Any:
    value: Any = "x"
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


hostile = st.one_of(anything, st.integers(60, 200).map(deep))

role = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), hostile)
message = st.one_of(
    st.fixed_dictionaries(
        {"role": role, "content": st.one_of(st.text(max_size=20), hostile)},
        optional={
            "name": hostile,
            "tool_calls": hostile,
            "tool_call_id": hostile,
            "audio": st.none(),
            "refusal": st.none(),
        },  # fmt: skip
    ),
    hostile,
)
field_values = {
    "stream": st.one_of(st.booleans(), hostile),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": hostile}), hostile),
    "n": st.one_of(st.just(1), st.none(), hostile),
    "temperature": st.one_of(st.floats(0, 2), hostile),
    "top_p": hostile,
    "max_tokens": st.one_of(st.integers(1, 50), hostile),
    "max_completion_tokens": st.one_of(st.integers(1, 50), hostile),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5), hostile),
    "seed": hostile,
    "tools": st.one_of(
        st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": st.text(max_size=5)}),
                }
            ),
            max_size=2,
        ),
        hostile,
    ),  # fmt: skip
    "tool_choice": hostile,
    "parallel_tool_calls": hostile,
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])}),
        hostile,
    ),
    "moa": st.one_of(st.fixed_dictionaries({"drafts": hostile}), hostile),
}
chat_body = st.one_of(
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.just("fake"), hostile),
            "messages": st.one_of(st.lists(message, min_size=1, max_size=3), hostile),
        },
        optional=field_values,
    ),  # fmt: skip
    hostile,
)
langserve_body = st.one_of(
    st.fixed_dictionaries({"input": hostile}, optional={"config": hostile, "kwargs": hostile}),
    st.fixed_dictionaries({"inputs": st.one_of(st.lists(hostile, max_size=3), hostile)}),
    hostile,
)
requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.sampled_from(ROUTES[1:]), langserve_body),
)


@pytest.fixture(scope="module")
def loop() -> Any:
    runner = asyncio.new_event_loop()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def app() -> Any:
    moa = ChatMoA(
        proposers=[ScriptedChatModel(reply="draft")],
        aggregator=ScriptedChatModel(reply="answer"),
    )
    return create_app({"fake": moa}, limits=ServeLimits(max_batch=3))


def send(loop: Any, app: Any, path: str, raw: bytes) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://moa") as client:
            return await client.post(path, content=raw,
                                     headers={"content-type": "application/json"})  # fmt: skip

    return loop.run_until_complete(post())


def encode(value: Any) -> bytes:
    """As a careless client would: Python's json writes NaN, Infinity and lone surrogates."""
    try:
        return json.dumps(value).encode()
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000


@settings(max_examples=2500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(sent=requests)
def test_no_body_gets_a_500_or_a_traceback(
    loop: Any, app: Any, sent: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    path, value = sent
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        response = send(loop, app, path, encode(value))
    assert response.status_code in (200, 400, 404, 413), (path, value, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text and "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

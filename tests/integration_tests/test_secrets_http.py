"""Hostile providers, every key source, every place a library user can look.

A key reaches a model four ways: the ``api_key=`` argument, an environment variable, the
userinfo of the base URL (``http://user:KEY@host/v1``) and a default header
(``X-Api-Key``). The scripted server quotes the caller's credential in its 401s, and
hostile proposers and aggregators echo their key in their answers. Whatever the source and
the key's shape (one no pattern knows among them), the key must not appear in:

- exceptions (`CallError`, `MoAError`): str, repr and the printed traceback;
- answers and ``response_metadata`` (drafts, the final answer, streamed chunks);
- what a tracer records (a `BaseTracer` over ChatMoA's invoke/ainvoke/stream/astream and
  over `build_moa_graph`): errors, outputs, tokens, inputs, ``serialized``, metadata;
- log records at every level, DEBUG included (the HTTP stack's own loggers);
- ``repr`` / ``str`` of `ChatMoA` and LangChain's ``serialized`` payload of it.
"""

from __future__ import annotations

import io
import json
import logging
import random
import string
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.load import dumpd
from langchain_core.messages import HumanMessage
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run
from langchain_openai import ChatOpenAI

from langchain_moa import ChatMoA, MoAError, build_moa_graph
from langchain_moa.calls import CallError
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer
from tests.support import call

pytestmark = pytest.mark.http

_rng = random.Random(20260517)
ALNUM = string.ascii_letters + string.digits


def _chars(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


SHAPES = {
    "openai-project": "sk-proj-" + _chars(ALNUM + "_-", 48),
    "groq": "gsk_" + _chars(ALNUM, 52),
    "plain-hex": _chars("0123456789abcdef", 40),
    "no-known-shape": "Qx" + _chars(ALNUM, 30),
    "random-20": _chars(ALNUM, 20),
    "lowercase-28": "zq" + _chars(string.ascii_lowercase + string.digits, 26),  # no net
}
SOURCES = ["api_key", "env", "base_url", "header"]


@dataclass
class Keyed:
    """Clients for one key given one way."""

    server: ScriptedOpenAIServer
    source: str
    key: str

    def client(self, model: str) -> ChatOpenAI:
        options: dict[str, Any] = {"model": model, "max_retries": 0}
        base = self.server.base_url
        if self.source == "api_key":
            options["api_key"] = self.key
        elif self.source == "base_url":
            base = base.replace("http://", f"http://moa-user:{self.key}@")
            options["api_key"] = "sk-scripted-test"
        elif self.source == "header":
            options["default_headers"] = {"X-Api-Key": self.key}
            options["api_key"] = "sk-scripted-test"
        # "env": ChatOpenAI reads OPENAI_API_KEY (set by the fixture)
        return ChatOpenAI(base_url=base, **options)


class Collector(BaseTracer):
    """Records every run (child runs included) as it ends."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        pass

    def _on_run_update(self, run: Run) -> None:
        self.runs.append(run)

    def text(self) -> str:
        return "\n".join(
            json.dumps(r.model_dump(exclude={"child_runs"}), default=repr) for r in self.runs
        )


@pytest.fixture(params=list(SHAPES))
def shape(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def keyed(
    request: pytest.FixtureRequest, shape: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Keyed]:
    source = request.param
    key = SHAPES[shape]
    if source == "env":
        monkeypatch.setenv("OPENAI_API_KEY", key)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    echo = f"Sure. My key is {key}; keep it safe."
    scripts = {
        "reject": ModelScript(reject_key=True),
        "echo": ModelScript(reply=echo),
        "draft": ModelScript(reply="a plain draft"),
        "agg": ModelScript(reply=f"Final answer (key {key})."),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        yield Keyed(server, source, key)


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """What a library user sees with ``logging.basicConfig(level=logging.DEBUG)``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def assert_clean_error(exc: BaseException, key: str) -> None:
    printed = "".join(traceback.format_exception(exc))
    for text in (str(exc), repr(exc), printed):
        assert key not in text, text
    assert "***" in str(exc)  # the provider did quote the key: masked, not lost


def dumped(value: Any) -> str:
    return json.dumps(value, default=repr)


# ------------------------------------------------------------------ ChatMoA faces


UNKNOWN = ["no-known-shape", "random-20", "lowercase-28"]  # removed by value alone
CASES = [(shape, how) for shape in UNKNOWN for how in ("invoke", "ainvoke", "stream", "astream")]
CASES += [(shape, "invoke") for shape in SHAPES if shape not in UNKNOWN]


@pytest.mark.parametrize("keyed", SOURCES, indirect=True)
@pytest.mark.parametrize(("shape", "how"), CASES, indirect=["shape"])
async def test_hostile_members_never_leak_the_key(
    keyed: Keyed, shape: str, how: str, debug_log: io.StringIO
) -> None:
    key = keyed.key
    collector = Collector()
    moa = ChatMoA(
        proposers=[keyed.client("reject"), keyed.client("echo"), keyed.client("draft")],
        aggregator=keyed.client("agg"),
    )
    result = await call(moa, "What is MoA?", how, {"callbacks": [collector]})
    if how in ("stream", "astream"):
        answer = result[0]
        for chunk in result[1:]:
            answer = answer + chunk
    else:
        answer = result
    assert answer.content == "Final answer (key ***)."
    proposals = answer.response_metadata["moa"]["layers"][0]["proposals"]
    assert proposals[0]["error"].startswith("OpenAIAuthenticationError")  # failed, masked
    assert proposals[1]["answer"] == "Sure. My key is ***; keep it safe."
    assert key not in dumped(answer.model_dump())

    # the tracer saw the provider's 401 (as a redacted CallError) and every answer
    traced = collector.text()
    assert key not in traced
    errors = [r.error for r in collector.runs if r.error]
    assert errors and all("CallError" in e and "***" in e for e in errors), errors
    assert len(collector.runs) == 5  # ChatMoA, three proposers, the aggregator

    failing = ChatMoA(proposers=[keyed.client("draft")], aggregator=keyed.client("reject"))
    with pytest.raises(CallError) as info:
        await call(failing, "q", how, {"callbacks": [collector]})
    assert_clean_error(info.value, key)
    strict = ChatMoA(
        proposers=[keyed.client("reject"), keyed.client("echo")],
        aggregator=keyed.client("agg"),
        min_proposers=2,
    )
    with pytest.raises(MoAError) as quorum:
        await call(strict, "q", how, {"callbacks": [collector]})
    assert_clean_error(quorum.value, key)
    assert key not in collector.text()

    logged = debug_log.getvalue()
    assert "httpcore" in logged or "openai" in logged  # DEBUG records were written
    assert key not in logged


@pytest.mark.parametrize("keyed", SOURCES, indirect=True)
@pytest.mark.parametrize("shape", UNKNOWN, indirect=True)
async def test_graph_runs_and_streams_never_leak_the_key(
    keyed: Keyed, shape: str, debug_log: io.StringIO
) -> None:
    key = keyed.key
    collector = Collector()
    graph = build_moa_graph(
        [keyed.client("reject"), keyed.client("echo"), keyed.client("draft")],
        keyed.client("agg"),
    )
    state = {"messages": [HumanMessage("q")]}
    config = {"callbacks": [collector]}
    final = graph.invoke(state, config)
    assert final["messages"][-1].content == "Final answer (key ***)."
    assert key not in dumped({k: v for k, v in final.items()})
    streamed = [
        part async for part in graph.astream(state, config, stream_mode=["messages", "updates"])
    ]
    assert key not in dumped(streamed)
    tokens = "".join(
        chunk.content for mode, (chunk, _meta) in (p for p in streamed if p[0] == "messages")
    )
    assert tokens == "Final answer (key ***)."
    events = [e async for e in graph.astream_events(state, config, version="v2")]
    assert key not in dumped(events)

    failing = build_moa_graph([keyed.client("draft")], keyed.client("reject"))
    for how in ("invoke", "ainvoke"):
        with pytest.raises(CallError) as info:
            await call(failing, state, how, config)
        assert_clean_error(info.value, key)
    assert key not in collector.text()
    assert any(r.error and "***" in r.error for r in collector.runs)
    assert key not in debug_log.getvalue()


@pytest.mark.parametrize("keyed", SOURCES, indirect=True)
@pytest.mark.parametrize("shape", ["no-known-shape", "random-20"], indirect=True)
def test_repr_and_serialized_never_show_member_keys(keyed: Keyed, shape: str) -> None:
    key = keyed.key
    collector = Collector()
    moa = ChatMoA(proposers=[keyed.client("draft")], aggregator=keyed.client("agg"))
    for text in (repr(moa), str(moa), dumped(dumpd(moa))):
        assert key not in text
    moa.invoke("q", {"callbacks": [collector]})
    serialized = dumped([r.serialized for r in collector.runs])
    assert "ChatMoA" in serialized and "ChatOpenAI" in serialized
    assert key not in serialized

"""The call layer's guarantees, on every face, with in-process fakes.

Each test here fails without the mechanism it names: concurrency bounds, where calls run
(thread and event loop), timeouts, hidden child runs, one-line errors naming the role, the
transient flag, configuration derived from public fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from pydantic import PrivateAttr

from langchain_moa import ChatMoA, ConfigError, MoAJudge, build_judge_graph, build_moa_graph
from langchain_moa.calls import (
    CallError,
    ModelCall,
    arun_all,
    invoke,
    run_all,
)
from langchain_moa.errors import is_transient_error
from langchain_moa.testing.fakes import ScriptedChatModel
from tests.support import PATHS, llm_runs
from tests.support import answer as run


class Tracked(ScriptedChatModel):
    """A fake that records where it ran (thread, running loop) and how many ran at once."""

    _where: list[tuple[str, Any]] = PrivateAttr(default_factory=list)

    @contextlib.contextmanager
    def _running(self, path: str) -> Iterator[None]:
        try:
            loop: Any = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with TRACKER["lock"]:
            TRACKER["now"] += 1
            TRACKER["peak"] = max(TRACKER["peak"], TRACKER["now"])
            TRACKER["where"].append((path, threading.current_thread().name, loop))
        try:
            yield
        finally:
            with TRACKER["lock"]:
                TRACKER["now"] -= 1

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        with self._running("sync"):
            return super()._generate(messages, stop, run_manager, **kw)

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        with self._running("sync"):
            yield from super()._stream(messages, stop, run_manager, **kw)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        with self._running("async"):
            return await super()._agenerate(messages, stop, run_manager, **kw)


TRACKER: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _reset_tracker() -> None:
    TRACKER.clear()
    TRACKER.update(lock=threading.Lock(), now=0, peak=0, where=[])


def tracked(name: str, reply: Any = None, **kw: Any) -> Tracked:
    return Tracked(model_name=name, reply=reply if reply is not None else f"{name} says hi", **kw)


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("how", PATHS)
async def test_max_concurrency_bounds_the_proposers(how: str) -> None:
    ps = [tracked(f"p{i}", delay=0.05) for i in range(4)]
    moa = ChatMoA(proposers=ps, aggregator=tracked("agg"), layers=2)
    await run(moa, "q", how, {"max_concurrency": 1})
    assert TRACKER["peak"] == 1
    TRACKER.update(peak=0)
    await run(moa, "q", how)  # unbounded: the four proposers overlap
    assert TRACKER["peak"] == 4


async def test_max_concurrency_bounds_the_judge() -> None:
    judges = [tracked(f"j{i}", "fine [[A]]", delay=0.03) for i in range(3)]
    judge = MoAJudge(judges=judges)
    judge.rank("q", ["a", "b", "c"], {"max_concurrency": 2})
    assert TRACKER["peak"] == 2
    TRACKER.update(peak=0)
    await judge.arank("q", ["a", "b", "c"], {"max_concurrency": 2})
    assert TRACKER["peak"] == 2


async def test_the_judges_own_max_concurrency_wins_over_the_configs() -> None:
    judges = [tracked(f"j{i}", "fine [[A]]", delay=0.03) for i in range(3)]
    judge = MoAJudge(judges=judges, max_concurrency=1)
    judge.rank("q", ["a", "b"], {"max_concurrency": 3})
    assert TRACKER["peak"] == 1
    await judge.arank("q", ["a", "b"], {"max_concurrency": 3})
    assert TRACKER["peak"] == 1


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_sync_paths_call_models_in_threads_without_an_event_loop(how: str) -> None:
    ps = [tracked("a"), tracked("b")]
    moa = ChatMoA(proposers=ps, aggregator=tracked("agg"), layers=3)
    if how == "invoke":
        moa.invoke("q")
    else:
        list(moa.stream("q"))
    where = TRACKER["where"]
    assert len(where) == 5
    # every model ran through its sync method, with no event loop running around it
    assert {(path, loop) for path, _thread, loop in where} == {("sync", None)}
    # the proposers of a layer ran on worker threads, not one after another here
    assert all(thread != threading.current_thread().name for _p, thread, _l in where[:4])


def test_sync_graph_calls_models_without_an_event_loop() -> None:
    graph = build_moa_graph([tracked("a"), tracked("b")], tracked("agg", "z"), layers=2)
    assert graph.invoke({"messages": [HumanMessage("q")]})["messages"][-1].content == "z"
    assert {(path, loop) for path, _thread, loop in TRACKER["where"]} == {("sync", None)}


async def test_async_paths_call_models_on_the_callers_loop() -> None:
    moa = ChatMoA(proposers=[tracked("a"), tracked("b")], aggregator=tracked("agg"), layers=2)
    await moa.ainvoke("q")
    loop = asyncio.get_running_loop()
    assert {(path, seen) for path, _thread, seen in TRACKER["where"]} == {("async", loop)}


# ------------------------------------------------------------------- timeouts


def test_a_timed_out_sync_call_frees_its_slot_and_is_abandoned_on_a_daemon_thread() -> None:
    slow_model, fast_model = tracked("slow"), tracked("fast")
    slow_model.invoke("warm up"), fast_model.invoke("warm up")  # first calls import lazily
    slow_model.delay = 5
    slow = ModelCall(slow_model, [HumanMessage("q")], "proposer 1", "proposer", timeout=0.3)
    fast = ModelCall(fast_model, [HumanMessage("q")], "proposer 2", "proposer", timeout=0.3)
    started = time.perf_counter()
    results = run_all([slow, fast], max_concurrency=1)
    assert time.perf_counter() - started < 2
    assert results[0].error is not None and results[0].error.timed_out
    assert str(results[0].error) == "proposer 1 (slow): TimeoutError: no answer within 0.3 s"
    assert results[1].error is None and results[1].message.content == "fast says hi"
    abandoned = [t for t in threading.enumerate() if t.name == "moa proposer 1"]
    assert abandoned and all(t.daemon for t in abandoned)


def APITimeoutError(message: str) -> openai.APITimeoutError:  # noqa: N802
    """The openai SDK's client-side timeout (classified by type, see `errors`)."""
    assert message == "Request timed out."  # the SDK's own text
    return openai.APITimeoutError(request=httpx.Request("POST", "https://x"))


@pytest.mark.parametrize("how", ["sync", "async"])
async def test_a_client_timeout_within_the_budget_reads_as_the_budget_running_out(
    how: str,
) -> None:
    # The budget is the client's request timeout too, so either timer may fire first;
    # the account must not depend on which one won.
    model = tracked("p")
    model.fail_always, model.error = True, APITimeoutError("Request timed out.")
    call = ModelCall(model, [HumanMessage("q")], "proposer 1", "proposer", timeout=0.5)
    result = run_all([call])[0] if how == "sync" else (await arun_all([call]))[0]
    assert result.error is not None and result.error.timed_out
    assert str(result.error) == "proposer 1 (p): TimeoutError: no answer within 0.5 s"
    untimed = ModelCall(model, [HumanMessage("q")], "proposer 1", "proposer")
    assert run_all([untimed])[0].error.error_type == "APITimeoutError"  # no budget: as is


def test_the_remaining_budget_is_passed_down_as_the_client_timeout() -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="m", api_key="sk-not-used", base_url="http://127.0.0.1:9/v1")
    call = ModelCall(model, [HumanMessage("q")], "proposer 1", "proposer", timeout=3.0)
    assert call.kwargs(2.5)["timeout"] == 2.5
    assert "timeout" not in ModelCall(tracked("x"), [], "p", "proposer").kwargs(2.5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "proposer_timeout must be greater than 0, got nan"),
        (-1, "proposer_timeout must be greater than 0, got -1"),
        (0, "proposer_timeout must be greater than 0, got 0"),
        ("soon", "proposer_timeout must be a number, got 'soon'"),
    ],
)
def test_bad_timeouts_are_one_line_errors(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ChatMoA(proposers=[tracked("a")], aggregator=tracked("agg"), proposer_timeout=value)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("how", PATHS)
async def test_infinite_timeout_means_no_limit(how: str) -> None:
    moa = ChatMoA(
        proposers=[tracked("a", delay=0.05)],
        aggregator=tracked("agg", "z"),
        proposer_timeout=math.inf,
    )
    assert moa.proposer_timeout is None and moa.engine.settings.proposer_timeout is None
    assert (await run(moa, "q", how)).content == "z"


# ------------------------------------------------------------------- child runs


def test_judge_graph_streams_only_the_final_answer_and_tracers_see_every_call() -> None:
    judge = MoAJudge(judges=[tracked("j", "A wins [[A]]")])
    generator = tracked("gen", lambda messages: "candidate text")
    graph = build_judge_graph(judge, generator, n=2)
    collector = RunCollectorCallbackHandler()
    events = list(graph.stream({"prompt": "q"}, {"callbacks": [collector]}, stream_mode="messages"))
    # judge verdicts and sampled candidates are hidden: only the graph's final answer shows
    assert [chunk.content for chunk, _ in events] == ["candidate text"]
    runs = llm_runs(collector)
    tags = sorted(next(t for t in r.tags if t.startswith("moa:")) for r in runs)
    assert tags == ["moa:judge", "moa:judge", "moa:sample", "moa:sample"]
    assert all("nostream" in r.tags for r in runs)


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("how", PATHS)
async def test_aggregator_failure_names_the_aggregator_in_one_line(how: str) -> None:
    agg = tracked("big-model", fail_always=True, error=RuntimeError("upstream said no\nline two"))
    moa = ChatMoA(proposers=[tracked("a")], aggregator=agg, layers=2)
    with pytest.raises(CallError) as info:
        await run(moa, "q", how)
    # complete (nothing cut) yet one line
    assert str(info.value) == "aggregator (big-model): RuntimeError: upstream said no line two"
    assert info.value.role == "aggregator" and info.value.model == "big-model"
    assert info.value.__cause__ is None and info.value.__context__ is None
    printed = "".join(traceback.format_exception(info.value))
    assert "no\nline two" not in printed and "RuntimeError(" not in printed


def test_call_errors_say_whether_a_retry_may_help() -> None:
    def fails(exc: Exception) -> CallError:
        call = ModelCall(
            tracked("m", fail_always=True, error=exc), [HumanMessage("q")], "judge 1", "judge"
        )
        with pytest.raises(CallError) as info:
            invoke(call)
        return info.value

    assert fails(ConnectionError("reset")).transient
    assert is_transient_error(fails(TimeoutError("slow")))
    assert not fails(ValueError("bad request")).transient
    assert fails(ValueError("bad request")).error_type == "ValueError"


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_max_retries_retries_transient_aggregator_failures_only(how: str) -> None:
    flaky = tracked("agg", "done", fail_times=1, error=ConnectionError("blip"))
    moa = ChatMoA(proposers=[tracked("a")], aggregator=flaky, layers=2, max_retries=1)
    assert (await run(moa, "q", how)).content == "done"
    assert len(flaky.calls) == 2
    broken = tracked("agg", fail_always=True, error=ValueError("bad"))
    moa = ChatMoA(proposers=[tracked("a")], aggregator=broken, layers=2, max_retries=3)
    with pytest.raises(CallError):
        await run(moa, "q", how)
    assert len(broken.calls) == 1


# ----------------------------------------------------------------- configuration


@pytest.mark.parametrize("how", PATHS)
async def test_model_copy_and_configurable_fields_change_what_runs(how: str) -> None:
    ps = [tracked("a")]
    agg = tracked("agg", "z")
    moa = ChatMoA(proposers=ps, aggregator=agg, layers=2)
    await run(moa.model_copy(update={"layers": 3}), "q", how)
    assert len(ps[0].calls) == 2  # two proposer layers, not one
    await run(moa.model_copy(update={"aggregator_prompt": "PROMPT-X"}), "q", how)
    assert "PROMPT-X" in agg.calls[-1][0].content
    from langchain_core.runnables import ConfigurableField

    configurable = moa.configurable_fields(layers=ConfigurableField(id="layers"))
    ps[0].calls.clear()
    await run(configurable, "q", how, {"configurable": {"layers": 4}})
    assert len(ps[0].calls) == 3


def test_unknown_arguments_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        ChatMoA(proposers=[tracked("a")], aggregator=tracked("agg"), proposer_timout=5)
    assert str(info.value) == (
        "ChatMoA got unknown argument(s): 'proposer_timout' (did you mean 'proposer_timeout'?)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 0}, "layers must be at least 1, got 0"),
        ({"layers": "two"}, "layers must be an integer, got 'two'"),
        ({"max_tokens": 0}, "ChatMoA: max_tokens: must be >= 1"),
    ],
)
def test_configuration_errors_are_one_line_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ChatMoA(proposers=[tracked("a")], aggregator=tracked("agg"), **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("how", PATHS)
async def test_standard_params_apply_to_the_aggregator_alone(how: str) -> None:
    p = tracked("a")
    agg = tracked("agg", "final")
    moa = ChatMoA(proposers=[p], aggregator=agg, temperature=0.1, max_tokens=50, stop=["END"])
    await run(moa, "q", how)
    assert agg.call_kwargs[-1]["temperature"] == 0.1
    assert agg.call_kwargs[-1]["max_tokens"] == 50 and agg.call_kwargs[-1]["stop"] == ["END"]
    assert "temperature" not in p.call_kwargs[-1] and p.call_kwargs[-1]["stop"] is None
    params = moa._get_ls_params()
    assert (params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (
        0.1,
        50,
        ["END"],
    )


@pytest.mark.parametrize("how", PATHS)
async def test_observe_sees_every_attempt_on_every_path(how: str) -> None:
    from langchain_moa.calls import observe

    seen: list[tuple[str, str | None]] = []
    flaky = tracked("flaky", fail_times=1, error=ConnectionError("reset"))
    moa = ChatMoA(proposers=[tracked("a"), flaky], aggregator=tracked("agg"), layers=2)
    with observe(lambda r: seen.append((r.call.role, r.error and r.error.error_type))):
        await run(moa, "q", how)
    roles = sorted(role for role, _ in seen)
    assert roles.count("aggregator") == 1 and roles.count("proposer 1") == 1
    assert ("proposer 2", "ConnectionError") in seen  # the failed attempt is reported too
    seen.clear()
    await run(moa, "q", how)
    assert seen == []  # outside the context nothing is reported


def test_with_stream_usage_asks_openai_compatible_models_unless_told_not_to() -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_openai import ChatOpenAI

    from langchain_moa.calls import with_stream_usage

    def client(**kwargs):
        return ChatOpenAI(model="m", base_url="http://127.0.0.1:9/v1", api_key="k", **kwargs)

    plain = client()
    asked = with_stream_usage(plain)
    assert asked.stream_usage is True and plain.stream_usage is None  # a copy, not mutated
    assert asked.root_client is plain.root_client  # same HTTP client
    bound = with_stream_usage(plain.bind_tools([{"type": "function", "function": {"name": "f"}}]))
    assert bound.bound.stream_usage is True and bound.kwargs["tools"]
    refused = client(stream_usage=False)
    assert with_stream_usage(refused) is refused
    already = client(stream_usage=True)
    assert with_stream_usage(already) is already
    fake = FakeListChatModel(responses=["x"])
    assert with_stream_usage(fake) is fake

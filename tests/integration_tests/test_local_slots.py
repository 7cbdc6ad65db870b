"""The embedded server's slots as client-side admission (`langchain_moa.local.SlotGate`).

A "local server" of one slot: the scripted HTTP server behind ChatOpenAI clients that share
a one-slot gate, as `local_chat_model` installs it. Waiting for the slot must not count
against a call's timeout; a call that overruns once it has the slot still times out, and
the slot is free again afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
from langchain_core.messages import HumanMessage

from langchain_moa import ChatMoA
from langchain_moa.calls import LayerClose, ModelCall, arun_all, run_all
from langchain_moa.local import SlotGate, slot_clients
from langchain_moa.testing.server import ModelScript, ScriptedOpenAIServer

LATENCY = 0.6  # each answer takes this long once it has the slot
TIMEOUT = 1.0  # > LATENCY, < 2 * LATENCY: only the first of three fits if the queue counts


@pytest.fixture
def server():
    with ScriptedOpenAIServer(default=ModelScript(reply="ok", latency=LATENCY)) as srv:
        yield srv


@pytest.fixture
def gate() -> SlotGate:
    return SlotGate(1)


def proposers(server: ScriptedOpenAIServer, gate: SlotGate, n: int = 3) -> list[ModelCall]:
    return [
        ModelCall(
            server.chat_model(f"p{i}", max_retries=0, **slot_clients(gate)),
            [HumanMessage("q")],
            f"proposer {i}",
            "proposer",
            timeout=TIMEOUT,
        )
        for i in range(1, n + 1)
    ]


def assert_slot_free(gate: SlotGate) -> None:
    """The slot comes back (an abandoned call's request ends within its client timeout)."""
    taker = threading.Thread(target=gate.acquire, daemon=True)
    taker.start()
    taker.join(timeout=10)
    assert not taker.is_alive(), "the slot was never given back"
    gate.release()
    assert gate.free == 1


async def assert_slot_free_async(gate: SlotGate) -> None:
    await asyncio.wait_for(gate.aacquire(), 10)
    gate.release()
    assert gate.free == 1


def test_queued_time_does_not_count_sync(server, gate) -> None:
    results = run_all(proposers(server, gate))
    assert [r.error for r in results] == [None, None, None]
    assert [r.message.content for r in results] == ["ok", "ok", "ok"]
    # They really were served one at a time: together they took the sum of their latencies.
    assert max(r.latency_s for r in results) >= 3 * LATENCY * 0.95
    assert len(server.requests) == 3
    assert_slot_free(gate)


async def test_queued_time_does_not_count_async(server, gate) -> None:
    results = await arun_all(proposers(server, gate))
    assert [r.error for r in results] == [None, None, None]
    assert [r.message.content for r in results] == ["ok", "ok", "ok"]
    assert max(r.latency_s for r in results) >= 3 * LATENCY * 0.95
    await assert_slot_free_async(gate)


def test_overrun_after_the_slot_still_times_out_sync(server, gate) -> None:
    server.set_script("p2", ModelScript(reply="late", latency=TIMEOUT + 1.0))
    results = run_all(proposers(server, gate, 2))
    by_role = {r.call.role: r for r in results}
    assert by_role["proposer 2"].error is not None
    assert by_role["proposer 2"].error.timed_out
    assert "no answer within 1 s" in str(by_role["proposer 2"].error)
    assert by_role["proposer 1"].message.content == "ok"
    assert_slot_free(gate)


async def test_overrun_after_the_slot_still_times_out_async(server, gate) -> None:
    server.set_script("p2", ModelScript(reply="late", latency=TIMEOUT + 1.0))
    results = await arun_all(proposers(server, gate, 2))
    by_role = {r.call.role: r for r in results}
    assert by_role["proposer 2"].error is not None and by_role["proposer 2"].error.timed_out
    assert by_role["proposer 1"].message.content == "ok"
    await assert_slot_free_async(gate)  # the timed-out task was cancelled


async def test_a_cancelled_waiter_gives_its_place_back(gate) -> None:
    await gate.aacquire()  # the only slot is taken
    waiting = asyncio.ensure_future(gate.aacquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.release()
    assert gate.free == 1  # not handed to the cancelled waiter
    await gate.aacquire()
    gate.release()


def moa_on_one_slot(server: ScriptedOpenAIServer, gate: SlotGate) -> ChatMoA:
    """Three proposers sharing one slot, every one required (``min_proposers=3``)."""
    return ChatMoA(
        proposers=[c.model for c in proposers(server, gate)],
        aggregator=server.chat_model("agg", max_retries=0),
        layers=2,
        proposer_timeout=TIMEOUT,
        min_proposers=3,
    )


def test_moa_proposers_queued_for_one_slot_all_answer(server, gate) -> None:
    answer = moa_on_one_slot(server, gate).invoke("q")
    assert answer.content == "ok"
    assert sorted(r.model for r in server.requests) == ["agg", "p1", "p2", "p3"]
    assert_slot_free(gate)


async def test_moa_proposers_queued_for_one_slot_all_answer_async(server, gate) -> None:
    answer = await moa_on_one_slot(server, gate).ainvoke("q")
    assert answer.content == "ok"
    await assert_slot_free_async(gate)


def test_a_straggler_dropped_while_queued_sends_nothing(server, gate) -> None:
    close = LayerClose(quorum=1, grace=0.0)  # the layer closes at its first answer
    calls = [replace(c, close=close) for c in proposers(server, gate)]
    results = run_all(calls)
    answered = [r for r in results if r.ok]
    assert [r.message.content for r in answered] == ["ok"]
    assert all(r.error.error_type == "Straggler" for r in results if not r.ok)
    assert_slot_free(gate)  # in line behind every queued call: they all had their turn
    # The first answer and the call in flight when the layer closed were sent; the call
    # still queued then never was (it used to take the slot for an answer nobody wanted).
    sent = [r.model for r in server.requests]
    assert answered[0].call.model.model_name in sent
    assert len(sent) <= 2

"""`steps.drive` and `steps.adrive`: one algorithm, the same outcome on both call layers."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from langchain_moa.calls import CallError, CallResult, ModelCall
from langchain_moa.steps import Steps, adrive, drive
from langchain_moa.testing.fakes import ScriptedChatModel

DRIVERS = ["drive", "adrive"]


async def run(driver: str, steps: Steps[Any], **kwargs: Any) -> Any:
    return drive(steps, **kwargs) if driver == "drive" else await adrive(steps, **kwargs)


def call(model: ScriptedChatModel, role: str) -> ModelCall:
    return ModelCall(model, [HumanMessage("q")], role, "judge")


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_batch_answers_results_in_order_and_one_call_answers_its_message(
    driver: str,
) -> None:
    first, second = ScriptedChatModel(reply="one"), ScriptedChatModel(reply="two")
    broken = ScriptedChatModel(fail_always=True)

    def steps() -> Steps[tuple[list[CallResult], str]]:
        results = yield [call(first, "a"), call(broken, "b"), call(second, "c")]
        message = yield call(second, "d")
        return results, message.text

    results, text = await run(driver, steps())
    assert [r.call.role for r in results] == ["a", "b", "c"]
    assert [r.message.text if r.message else None for r in results] == ["one", None, "two"]
    assert results[1].error is not None  # a failed call of a batch is a result, not raised
    assert text == "two"
    assert (len(first.calls), len(second.calls), len(broken.calls)) == (1, 2, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failed_single_call_is_thrown_in_at_its_yield(driver: str) -> None:
    broken = ScriptedChatModel(model_name="m", fail_always=True)
    after = ScriptedChatModel(reply="after")

    def steps() -> Steps[tuple[str, str]]:
        try:
            yield call(broken, "judge 1")
        except CallError as error:
            caught = str(error)
        message = yield call(after, "judge 2")  # the steps go on after handling it
        return caught, message.text

    caught, text = await run(driver, steps())
    assert caught == "judge 1 (m): RuntimeError: scripted failure"
    assert text == "after"


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_uncaught_call_error_ends_the_run_unchained(driver: str) -> None:
    broken = ScriptedChatModel(model_name="m", fail_always=True)
    never = ScriptedChatModel()

    def steps() -> Steps[None]:
        yield call(broken, "aggregator")
        yield call(never, "after")

    with pytest.raises(CallError) as info:
        await run(driver, steps())
    assert info.value.role == "aggregator"
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert never.calls == []


@pytest.mark.parametrize("driver", DRIVERS)
async def test_steps_that_call_nothing_return_their_value(driver: str) -> None:
    def steps() -> Steps[int]:
        return 42
        yield  # a generator

    assert await run(driver, steps()) == 42

"""Helpers shared by the unit and the integration tests (fixtures live in the conftest.py files).

- `call` and `answer` run a runnable through one of its four public paths (`PATHS`);
- `llm_runs` flattens what a run collector traced to its chat-model runs;
- `ChatMoAStandardTests` is what ChatMoA declares to both of LangChain's standard suites;
- `interruptible` makes a child process take Ctrl-C as a foreground program does.
"""

from __future__ import annotations

import functools
import operator
import signal
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langchain_core.tracers.schemas import Run

from langchain_moa import ChatMoA

PATHS = ["invoke", "ainvoke", "stream", "astream"]


def interruptible() -> None:
    """``preexec_fn`` for a child that a test interrupts with Ctrl-C (SIGINT).

    A shell starts background jobs with SIGINT ignored, and children inherit that, so under
    ``nohup pytest &`` (or any runner that does the same) a Ctrl-C test would wait for an
    interruption that never comes. The child gets the default disposition back, as a
    program started at a terminal has it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def call(runnable: Any, value: Any, how: str, config: Any = None, **kwargs: Any) -> Any:
    """`runnable` run on `value` through the path `how` (one of `PATHS`): what invoke or
    ainvoke return, or the list of what stream or astream yield (`kwargs` go to the call)."""
    if how == "invoke":
        return runnable.invoke(value, config, **kwargs)
    if how == "ainvoke":
        return await runnable.ainvoke(value, config, **kwargs)
    if how == "stream":
        return list(runnable.stream(value, config, **kwargs))
    return [chunk async for chunk in runnable.astream(value, config, **kwargs)]


async def answer(runnable: Any, value: Any, how: str, config: Any = None) -> Any:
    """What `call` returns, a stream's chunks added up into one message."""
    result = await call(runnable, value, how, config)
    return functools.reduce(operator.add, result) if how in ("stream", "astream") else result


def llm_runs(collector: RunCollectorCallbackHandler) -> list[Run]:
    """Every chat-model run the collector traced, nested ones included, depth first."""

    def walk(run: Run) -> list[Run]:
        found = [run] if run.run_type == "llm" else []
        for child in run.child_runs:
            found.extend(walk(child))
        return found

    return [run for root in collector.traced_runs for run in walk(root)]


class ChatMoAStandardTests:
    """Mixed in before `ChatModelUnitTests` or `ChatModelIntegrationTests`: the MoA both
    standard suites test (two proposers and an aggregator over two layers, each built by
    `member`) and the capabilities ChatMoA declares, the same in both."""

    chat_model_class = ChatMoA
    has_tool_choice = True
    returns_usage_metadata = True
    supports_json_mode = True
    supports_model_override = True
    model_override_value = "aggregator-override"

    def member(self, name: str) -> BaseChatModel:
        """The chat model a member named `name` is in this suite."""
        raise NotImplementedError

    @property
    def chat_model_params(self) -> dict:
        return {
            "proposers": [self.member("proposer-a"), self.member("proposer-b")],
            "aggregator": self.member("aggregator"),
            "layers": 2,
        }

"""Each algorithm once, run by a thin sync or async driver (sans-IO steps).

An algorithm that calls models (a MoA run, a graph node, a judge's rank) is written once as
a generator of *steps*: it yields what it needs called and receives the answer, then returns
its value. `drive` runs such a generator with the sync call layer, `adrive` with the async
one, so the sync and async faces are two lines each and cannot drift apart.

What a step yields, and what it gets back:

- a list of `ModelCall` (a batch): run concurrently (`calls.run_all` / `calls.arun_all`),
  answered with their `CallResult` list in the same order; failures are results, never
  raised.
- one `ModelCall`: called with retries (`calls.invoke` / `calls.ainvoke`), answered with its
  `AIMessage`; a failure is thrown into the generator at the ``yield`` as the `CallError`
  (raised outside any exception handler, so nothing is chained to it), where the algorithm
  may catch it or let it end the run.

    def steps(calls):
        results = yield calls           # a batch
        message = yield aggregator_call # one call: raises CallError here on failure
        return answer

    drive(steps(...), config)           # sync
    await adrive(steps(...), config)    # async
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig

from langchain_moa import calls
from langchain_moa.calls import ModelCall
from langchain_moa.errors import CallError

T = TypeVar("T")

Steps = Generator[ModelCall | Sequence[ModelCall], Any, T]
"""An algorithm: yields a `ModelCall` or a batch of them, receives the answer, returns T."""


class _Cursor:
    """Where a run of steps stands: iterating it resumes the steps with the answer (or
    throws the `CallError`) that the driver left, and yields what they want next."""

    __slots__ = ("steps", "answer", "failed", "value")

    def __init__(self, steps: Steps[Any]) -> None:
        self.steps = steps
        self.answer: Any = None
        self.failed: CallError | None = None
        self.value: Any = None

    def __iter__(self) -> _Cursor:
        return self

    def __next__(self) -> ModelCall | Sequence[ModelCall]:
        failed, self.failed = self.failed, None
        try:
            if failed is not None:  # thrown outside any handler: nothing is chained to it
                return self.steps.throw(failed)
            return self.steps.send(self.answer)
        except StopIteration as done:
            self.value = done.value
            raise


def drive(
    steps: Steps[T], config: RunnableConfig | None = None, *, max_concurrency: int | None = None
) -> T:
    """Run `steps` with the sync call layer (threads for a batch); its return value.

    `max_concurrency` bounds every batch (default: ``config["max_concurrency"]``).
    """
    cursor = _Cursor(steps)
    for wanted in cursor:
        if isinstance(wanted, ModelCall):
            try:
                cursor.answer = calls.invoke(wanted, config)
            except CallError as error:
                cursor.failed = error
        else:
            cursor.answer = calls.run_all(wanted, config, max_concurrency=max_concurrency)
    return cursor.value


async def adrive(
    steps: Steps[T], config: RunnableConfig | None = None, *, max_concurrency: int | None = None
) -> T:
    """Async `drive`: the same steps with the async call layer (tasks for a batch)."""
    cursor = _Cursor(steps)
    for wanted in cursor:
        if not isinstance(wanted, ModelCall):
            cursor.answer = await calls.arun_all(wanted, config, max_concurrency=max_concurrency)
            continue
        try:
            cursor.answer = await calls.ainvoke(wanted, config)
        except CallError as error:
            cursor.failed = error
    return cursor.value


__all__ = ["Steps", "adrive", "drive"]

"""The Mixture-of-Agents engine: the one implementation every face calls.

`MoAEngine` owns the algorithm: which messages each layer's proposers receive, running
proposers concurrently (threads on the sync path, tasks on the async path; never a fresh
event loop per call), dropping failed/slow/empty proposers, the quorum check, what the
aggregator receives, usage totals and the per-layer metadata. `ChatMoA`, the LangGraph
nodes, the judge and the CLI all go through it, so the request structure is defined once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ContextThreadPoolExecutor
from pydantic import BaseModel, ConfigDict

from langchain_moa.errors import MoAError
from langchain_moa.models import model_label
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT
from langchain_moa.redaction import redact, secret_values
from langchain_moa.references import inject_references, text_only_history

#: Tags on proposer runs. ``nostream`` keeps drafts out of LangGraph's
#: ``stream_mode="messages"``; ``moa:proposer`` lets callbacks filter them.
PROPOSER_TAGS: tuple[str, ...] = ("moa:proposer", "nostream")
#: Tags on the aggregator run inside `ChatMoA` (its tokens are re-emitted by the
#: ChatMoA run itself, so the child run must not stream them a second time).
HIDDEN_AGGREGATOR_TAGS: tuple[str, ...] = ("moa:aggregator", "nostream")
#: Tags on the aggregator run when it is the visible, final step (graph face).
VISIBLE_AGGREGATOR_TAGS: tuple[str, ...] = ("moa:aggregator",)

_TOOL_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "strict")


class Proposal(BaseModel):
    """One proposer's contribution to one layer: its answer, or why it has none."""

    model_config = ConfigDict(frozen=True)

    layer: int
    proposer: int
    model: str
    answer: str | None = None
    usage: dict[str, Any] | None = None
    latency_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.answer)


def answers_of(proposals: Sequence[Proposal]) -> list[str]:
    """Successful answers in proposer order (never completion order)."""
    return [p.answer for p in sorted(proposals, key=lambda p: p.proposer) if p.ok and p.answer]


def sum_usage(usages: Sequence[UsageMetadata | dict | None]) -> UsageMetadata | None:
    """Add token counts; ``None`` when no call reported usage."""
    total: UsageMetadata | None = None
    for usage in usages:
        if usage:
            total = add_usage(total, usage)  # type: ignore[arg-type]
    return total


def _merge_config(config: RunnableConfig | None, **updates: Any) -> RunnableConfig:
    """Child config: keep the caller's callbacks/configurable, add tags/metadata/name."""
    base: dict[str, Any] = dict(config or {})
    tags = updates.pop("tags", ())
    metadata = updates.pop("metadata", {})
    base["tags"] = [*base.get("tags", []), *tags]
    base["metadata"] = {**base.get("metadata", {}), **metadata}
    base.update(updates)
    return base  # type: ignore[return-value]


@dataclass(frozen=True)
class MoAEngine:
    """A validated MoA configuration plus the operations of the algorithm."""

    proposers: tuple[BaseChatModel, ...]
    aggregator: BaseChatModel
    layers: int = 2
    aggregator_prompt: str = DEFAULT_AGGREGATOR_PROMPT
    proposer_timeout: float | None = None
    min_proposers: int = 1
    aggregator_tags: tuple[str, ...] = HIDDEN_AGGREGATOR_TAGS
    _secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_moa_config(
            n_proposers=len(self.proposers),
            layers=self.layers,
            min_proposers=self.min_proposers,
            proposer_timeout=self.proposer_timeout,
        )
        object.__setattr__(
            self, "_secrets", tuple(secret_values([*self.proposers, self.aggregator]))
        )

    # ----------------------------------------------------------------- structure
    @property
    def proposer_layers(self) -> int:
        """Number of proposer layers (the last layer is the aggregator)."""
        return self.layers - 1

    def proposer_input(
        self, conversation: Sequence[BaseMessage], previous: Sequence[Proposal] | None
    ) -> list[BaseMessage]:
        """Messages for every proposer of a layer: tool parts as text, previous answers injected."""
        history = text_only_history(conversation)
        if previous is None:
            return history
        return inject_references(history, answers_of(previous), self.aggregator_prompt)

    def aggregator_input(
        self, conversation: Sequence[BaseMessage], previous: Sequence[Proposal] | None
    ) -> list[BaseMessage]:
        """Messages for the aggregator: the conversation with the last layer's answers injected."""
        if previous is None:
            return list(conversation)
        return inject_references(conversation, answers_of(previous), self.aggregator_prompt)

    def check_conversation(self, conversation: Sequence[BaseMessage]) -> None:
        if not conversation:
            raise ValueError(
                "MoA got an empty conversation: pass a question string or at least one message"
            )

    def check_quorum(self, proposals: Sequence[Proposal]) -> None:
        """Raise `MoAError` naming every failed proposer when too few answered."""
        ok = sum(p.ok for p in proposals)
        if ok >= self.min_proposers:
            return
        failed = [p for p in proposals if not p.ok]
        layer = proposals[0].layer if proposals else 0
        details = "; ".join(f"proposer {p.proposer} ({p.model}): {p.error}" for p in failed)
        raise MoAError(
            f"only {ok} of {len(proposals)} proposers answered in layer {layer} "
            f"(min_proposers={self.min_proposers}): {details}",
            failures=failed,
        )

    # ---------------------------------------------------------------- proposers
    def _proposer_config(
        self, config: RunnableConfig | None, layer: int, index: int
    ) -> RunnableConfig:
        return _merge_config(
            config,
            tags=PROPOSER_TAGS,
            metadata={"moa_layer": layer, "moa_proposer": index},
            run_name=f"moa_proposer_{layer}_{index}",
        )

    def _error_text(self, exc: BaseException) -> str:
        text = redact(str(exc), self._secrets).strip()
        first = text.splitlines()[0][:500] if text else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

    def _proposal(
        self, layer: int, index: int, started: float, result: Any = None, error: str | None = None
    ) -> Proposal:
        model = self.proposers[index]
        latency = time.perf_counter() - started
        if error is not None:
            return Proposal(
                layer=layer,
                proposer=index,
                model=model_label(model),
                latency_s=latency,
                error=error,
            )
        message: AIMessage = result
        name = message.response_metadata.get("model_name") or model_label(model)
        answer = message.text.strip()
        return Proposal(
            layer=layer,
            proposer=index,
            model=str(name),
            answer=answer or None,
            usage=dict(message.usage_metadata) if message.usage_metadata else None,
            latency_s=latency,
            error=None if answer else "empty answer",
        )

    def failed_proposal(
        self, layer: int, index: int, started: float, exc: BaseException
    ) -> Proposal:
        """A failed `Proposal` for `exc` (redacted text; our own timeout gets its usual text)."""
        if self.is_own_timeout(exc):
            return self._proposal(layer, index, started, error=self._timeout_text())
        return self._proposal(layer, index, started, error=self._error_text(exc))

    def is_own_timeout(self, exc: BaseException) -> bool:
        """True when `exc` is `proposer_timeout` expiring (not a provider's own timeout).

        ``asyncio.wait_for`` raises a bare TimeoutError; the threaded path raises one
        carrying the timeout text.
        """
        return (
            self.proposer_timeout is not None
            and isinstance(exc, (TimeoutError, asyncio.TimeoutError))
            and str(exc) in ("", self._timeout_text())
        )

    def _timeout_text(self) -> str:
        return f"TimeoutError: no answer within {self.proposer_timeout:g} s (proposer_timeout)"

    async def acall_proposer(
        self,
        layer: int,
        index: int,
        messages: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        *,
        capture_errors: bool = True,
    ) -> Proposal:
        """Ask one proposer; failures become a `Proposal` with `error` unless told to raise."""
        started = time.perf_counter()
        call = self.proposers[index].ainvoke(
            list(messages), self._proposer_config(config, layer, index)
        )

        async def guarded() -> tuple[Any, Exception | None]:
            # Catch the proposer's own errors here, so a TimeoutError reaching
            # wait_for below can only be ours (a provider may raise TimeoutError too).
            try:
                return await call, None
            except Exception as exc:
                return None, exc

        try:
            result, error = await asyncio.wait_for(guarded(), self.proposer_timeout)
        except asyncio.TimeoutError:
            if not capture_errors:
                raise
            return self._proposal(layer, index, started, error=self._timeout_text())
        if error is not None:
            if not capture_errors:
                raise error
            return self._proposal(layer, index, started, error=self._error_text(error))
        return self._proposal(layer, index, started, result)

    def _call_proposer_untimed(
        self,
        layer: int,
        index: int,
        messages: Sequence[BaseMessage],
        config: RunnableConfig | None,
        capture_errors: bool,
    ) -> Proposal:
        started = time.perf_counter()
        try:
            result = self.proposers[index].invoke(
                list(messages), self._proposer_config(config, layer, index)
            )
        except Exception as exc:
            if not capture_errors:
                raise
            return self._proposal(layer, index, started, error=self._error_text(exc))
        return self._proposal(layer, index, started, result)

    def run_layer(
        self,
        layer: int,
        messages: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        *,
        indices: Sequence[int] | None = None,
        capture_errors: bool = True,
    ) -> list[Proposal]:
        """Run the given proposers (default: all) concurrently in threads.

        Threads, not an event loop: sync chat-model clients are thread-safe and this
        never creates a loop that an async client could get bound to. A proposer still
        running at `proposer_timeout` is recorded as timed out; its thread is abandoned.
        """
        indices = list(range(len(self.proposers))) if indices is None else list(indices)
        started = time.perf_counter()
        executor = ContextThreadPoolExecutor(max_workers=max(1, len(indices)))
        futures = {
            executor.submit(
                self._call_proposer_untimed, layer, i, messages, config, capture_errors
            ): i
            for i in indices
        }
        try:
            done, _ = concurrent.futures.wait(futures, timeout=self.proposer_timeout)
            results: dict[int, Proposal] = {}
            for future, i in futures.items():
                if future in done:
                    results[i] = future.result()
                elif capture_errors:
                    results[i] = self._proposal(layer, i, started, error=self._timeout_text())
                else:
                    raise TimeoutError(self._timeout_text())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        return [results[i] for i in indices]

    async def arun_layer(
        self,
        layer: int,
        messages: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[Proposal]:
        """Run the given proposers (default: all) concurrently as asyncio tasks."""
        indices = list(range(len(self.proposers))) if indices is None else list(indices)
        return list(
            await asyncio.gather(
                *(self.acall_proposer(layer, i, messages, config) for i in indices)
            )
        )

    def propose(
        self, conversation: Sequence[BaseMessage], config: RunnableConfig | None = None
    ) -> list[list[Proposal]]:
        """Run every proposer layer (sync), checking the quorum after each."""
        self.check_conversation(conversation)
        layers: list[list[Proposal]] = []
        for layer in range(1, self.proposer_layers + 1):
            messages = self.proposer_input(conversation, layers[-1] if layers else None)
            proposals = self.run_layer(layer, messages, config)
            self.check_quorum(proposals)
            layers.append(proposals)
        return layers

    async def apropose(
        self, conversation: Sequence[BaseMessage], config: RunnableConfig | None = None
    ) -> list[list[Proposal]]:
        """Run every proposer layer (async), checking the quorum after each."""
        self.check_conversation(conversation)
        layers: list[list[Proposal]] = []
        for layer in range(1, self.proposer_layers + 1):
            messages = self.proposer_input(conversation, layers[-1] if layers else None)
            proposals = await self.arun_layer(layer, messages, config)
            self.check_quorum(proposals)
            layers.append(proposals)
        return layers

    # --------------------------------------------------------------- aggregator
    def aggregator_runnable(self, **kwargs: Any) -> Runnable:
        """The aggregator with call-time tools / options applied (tools go to it alone)."""
        tool_kwargs = {k: kwargs.pop(k) for k in _TOOL_KWARGS if k in kwargs}
        runnable: Runnable = self.aggregator
        if "tools" in tool_kwargs:
            tools = tool_kwargs.pop("tools")
            runnable = self.aggregator.bind_tools(tools, **tool_kwargs)
        elif tool_kwargs:
            kwargs.update(tool_kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k != "stop"}
        if kwargs:
            runnable = runnable.bind(**kwargs)
        return runnable

    def aggregator_config(self, config: RunnableConfig | None) -> RunnableConfig:
        return _merge_config(
            config,
            tags=self.aggregator_tags,
            run_name="moa_aggregator",
            metadata={"moa_layer": self.layers},
        )

    # ------------------------------------------------------------------ results
    def metadata(
        self,
        layers: Sequence[Sequence[Proposal]],
        aggregator_model: str,
        aggregator_usage: UsageMetadata | dict | None,
        aggregator_latency_s: float,
    ) -> dict[str, Any]:
        """The ``response_metadata["moa"]`` record: every proposal of every layer."""
        return {
            "layers": [
                {"layer": i, "proposals": [p.model_dump() for p in proposals]}
                for i, proposals in enumerate(layers, 1)
            ],
            "aggregator": {
                "model": aggregator_model,
                "usage": dict(aggregator_usage) if aggregator_usage else None,
                "latency_s": aggregator_latency_s,
            },
        }

    def proposer_usage(self, layers: Sequence[Sequence[Proposal]]) -> UsageMetadata | None:
        return sum_usage([p.usage for proposals in layers for p in proposals])

    def final_message(
        self, layers: Sequence[Sequence[Proposal]], aggregate: AIMessage, latency_s: float
    ) -> AIMessage:
        """The user-facing answer: aggregator content, summed usage, MoA metadata."""
        model_name = aggregate.response_metadata.get("model_name") or model_label(self.aggregator)
        usage = sum_usage([self.proposer_usage(layers), aggregate.usage_metadata])
        response_metadata = final_response_metadata(aggregate.response_metadata)
        response_metadata["model_name"] = str(model_name)
        response_metadata["moa"] = self.metadata(
            layers, str(model_name), aggregate.usage_metadata, latency_s
        )
        return AIMessage(
            content=aggregate.content,
            tool_calls=aggregate.tool_calls,
            invalid_tool_calls=aggregate.invalid_tool_calls,
            additional_kwargs=aggregate.additional_kwargs,
            usage_metadata=usage,
            response_metadata=response_metadata,
        )


_KEPT_RESPONSE_KEYS = ("finish_reason", "model_provider", "system_fingerprint", "service_tier")


def final_response_metadata(aggregator_metadata: dict[str, Any]) -> dict[str, Any]:
    """Keep the aggregator's response fields that describe the final answer."""
    return {k: aggregator_metadata[k] for k in _KEPT_RESPONSE_KEYS if k in aggregator_metadata}


def validate_moa_config(
    *, n_proposers: int, layers: int, min_proposers: int, proposer_timeout: float | None
) -> None:
    """Raise a one-line `ValueError` for a configuration that cannot work."""
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an integer >= 1 (1 = aggregator alone), got {layers!r}")
    if layers > 1 and n_proposers == 0:
        raise ValueError(
            f"layers={layers} needs at least one proposer; pass proposers=[...] or use layers=1"
        )
    if not isinstance(min_proposers, int) or min_proposers < 1:
        raise ValueError(f"min_proposers must be an integer >= 1, got {min_proposers!r}")
    if layers > 1 and min_proposers > n_proposers:
        raise ValueError(
            f"min_proposers={min_proposers} is more than the {n_proposers} proposers given; "
            f"lower min_proposers or add proposers"
        )
    if proposer_timeout is not None and proposer_timeout <= 0:
        raise ValueError(
            f"proposer_timeout must be a positive number of seconds or None, "
            f"got {proposer_timeout!r}"
        )

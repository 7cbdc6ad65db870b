"""The Mixture-of-Agents engine: the algorithm, once, on top of the call layer.

`MoAEngine` decides what every request contains and in what order requests happen: which
messages each layer's proposers receive (the references of the previous layer injected),
the quorum check after each layer, what the aggregator receives, the summed usage and the
``response_metadata["moa"]`` record. Every model call goes through `langchain_moa.calls`
(fan-out, timeouts, tags, redacted errors). `ChatMoA`, the graph nodes, the judge's MoA
aggregation and the CLI are thin adapters over `run` / `arun` / `stream` / `astream` or,
for the graph, over the single steps those are made of.

The algorithm is written once, as steps (`langchain_moa.steps`): ``layer_steps``,
``propose_steps`` and ``run_steps`` yield the calls they need and receive the answers;
``run`` and ``arun`` drive them with the sync or the async call layer.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, ConfigDict

from langchain_moa import calls
from langchain_moa.calls import CallResult, LayerClose, ModelCall, sum_usage
from langchain_moa.errors import MoAError
from langchain_moa.models import model_label
from langchain_moa.references import inject_references, text_only_history
from langchain_moa.settings import EarlyStop, MoASettings
from langchain_moa.steps import Steps, adrive, drive

_TOOL_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "strict")
_KEPT_RESPONSE_KEYS = ("finish_reason", "model_provider", "system_fingerprint", "service_tier")


class Proposal(BaseModel):
    """One proposer's contribution to one layer: its answer, or why it has none.

    ``proposer`` is the 0-based index into ``proposers`` (people read ``proposer
    {proposer + 1}`` in messages and the CLI); ``layer`` counts from 1.
    """

    model_config = ConfigDict(frozen=True)

    layer: int
    proposer: int
    model: str
    answer: str | None = None
    usage: dict[str, Any] | None = None
    latency_s: float = 0.0
    error: str | None = None
    transient: bool | None = None
    """For a failed call: whether retrying may succeed (None when it answered)."""

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.answer)

    @property
    def dropped(self) -> bool:
        """A straggler: dropped when its layer closed early (see `calls.LayerClose`)."""
        return self.error is not None and self.error.startswith("straggler:")

    @property
    def label(self) -> str:
        """``proposer 2 (model)``: how messages name this proposal (1-based)."""
        return f"proposer {self.proposer + 1} ({self.model})"


@dataclass(frozen=True)
class MoAResult:
    """The outcome of one MoA run: the final message and every proposer layer."""

    message: AIMessage
    layers: list[list[Proposal]] = field(default_factory=list)


def proposal_of(result: CallResult) -> Proposal | None:
    """The `Proposal` a finished proposer call makes; None for any other call.

    For live views of the drafts (`calls.observe`): the CLI's ``--show-proposals`` and the
    server's ``moa.draft`` events read each draft from here as soon as it is done, in the
    same form ``response_metadata["moa"]`` records it.
    """
    meta = result.call.metadata
    if "moa_proposer" not in meta:
        return None
    return _proposal(meta.get("moa_layer", 1), meta["moa_proposer"], result)


def _proposal(layer: int, index: int, result: CallResult) -> Proposal:
    if result.error is not None:
        return Proposal(
            layer=layer,
            proposer=index,
            model=result.call.model_name,
            latency_s=result.latency_s,
            error=result.error.reason,
            transient=result.error.transient,
        )
    message = result.message
    assert message is not None
    name = message.response_metadata.get("model_name") or result.call.model_name
    answer = message.text.strip()
    return Proposal(
        layer=layer,
        proposer=index,
        model=str(name),
        answer=answer or None,
        usage=dict(message.usage_metadata) if message.usage_metadata else None,
        latency_s=result.latency_s,
        error=None if answer else "empty answer",
        transient=None if answer else True,
    )


def answers_of(proposals: Sequence[Proposal]) -> list[str]:
    """Successful answers in proposer order (never completion order)."""
    return [p.answer for p in sorted(proposals, key=lambda p: p.proposer) if p.ok and p.answer]


# -------------------------------------------------------------------- early stop


def normalize_answer(text: str) -> str:
    """Casefold, collapse whitespace, strip trailing punctuation (for agreement checks)."""
    collapsed = " ".join(text.casefold().split())
    end = len(collapsed)
    while end and (
        collapsed[end - 1].isspace() or unicodedata.category(collapsed[end - 1]).startswith("P")
    ):
        end -= 1
    return collapsed[:end]


def agreement(answers: Sequence[str]) -> bool:
    """True when at least two answers exist and all are equal after `normalize_answer`.

    A single answer is not agreement: with one successful proposer there is nobody to
    agree with, and skipping the refinement layers would be a guess.
    """
    return len(answers) >= 2 and len({normalize_answer(a) for a in answers}) == 1


def early_stop_predicate(early_stop: EarlyStop) -> Callable[[list[str]], bool] | None:
    """The function `early_stop` stands for (validated by `MoASettings`), or None."""
    if early_stop is None:
        return None
    return agreement if early_stop == "agreement" else early_stop  # type: ignore[return-value]


# --------------------------------------------------------------------- results


def final_response_metadata(aggregator_metadata: dict[str, Any]) -> dict[str, Any]:
    """Keep the aggregator's response fields that describe the final answer."""
    return {k: aggregator_metadata[k] for k in _KEPT_RESPONSE_KEYS if k in aggregator_metadata}


def _as_chunk(message: BaseMessage) -> AIMessageChunk:
    """Models without native streaming yield a whole `AIMessage`; make it a chunk."""
    if isinstance(message, AIMessageChunk):
        return message
    return AIMessageChunk(
        content=message.content,
        tool_call_chunks=[
            {
                "name": call["name"],
                "args": json.dumps(call["args"], ensure_ascii=False),
                "id": call["id"],
                "index": i,
            }
            for i, call in enumerate(getattr(message, "tool_calls", []))
        ],
        additional_kwargs=message.additional_kwargs,
        usage_metadata=getattr(message, "usage_metadata", None),
        response_metadata=message.response_metadata,
    )


def _forwarded(chunk: AIMessageChunk) -> AIMessageChunk:
    """An aggregator chunk as a MoA chunk: content and tool calls only.

    Identity, usage and response metadata are stated once, in the closing chunk, so
    merging the stream yields one id, one `model_name` and one usage record (the total).
    """
    return AIMessageChunk(
        content=chunk.content,
        tool_call_chunks=chunk.tool_call_chunks,
        additional_kwargs=chunk.additional_kwargs,
    )


class _Relay:
    """The aggregator's streamed chunks as MoA chunks, then the closing chunk.

    The closing chunk states the total usage and ``response_metadata["moa"]`` once, with
    the aggregator's latency counted from the relay's start (just before its request).
    """

    __slots__ = ("engine", "layers", "merged", "started")

    def __init__(self, engine: MoAEngine, layers: list[list[Proposal]]) -> None:
        self.engine = engine
        self.layers = layers
        self.merged: AIMessageChunk | None = None
        self.started = time.perf_counter()

    def forward(self, chunk: BaseMessage) -> AIMessageChunk:
        piece = _as_chunk(chunk)
        self.merged = piece if self.merged is None else self.merged + piece
        return _forwarded(piece)

    def closing(self) -> AIMessageChunk:
        latency = time.perf_counter() - self.started
        return self.engine.closing_chunk(self.layers, self.merged, latency)


@dataclass(frozen=True)
class MoAEngine:
    """A validated MoA configuration plus the operations of the algorithm.

    Cheap to build (no I/O): `ChatMoA` derives one from its public fields on every call,
    so a copied or reconfigured model never runs a stale configuration.
    """

    proposers: tuple[BaseChatModel, ...]
    aggregator: Runnable
    settings: MoASettings = field(default_factory=MoASettings)
    """The validated MoA settings (layers, quorum, timeouts, early stop, placement...)."""
    aggregator_hidden: bool = True
    """Hidden inside `ChatMoA` (it re-emits the tokens itself); visible in the graph."""
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    """Default call options for the aggregator (temperature, max_tokens, stop...)."""
    aggregator_timeout: float | None = None
    """Seconds for the aggregator's call, None for no limit (validated by the face)."""
    aggregator_retries: int = 0

    def __post_init__(self) -> None:
        self.settings.check_proposers(len(self.proposers))

    # ----------------------------------------------------------------- structure
    @property
    def proposer_layers(self) -> int:
        """Number of proposer layers (the last layer is the aggregator)."""
        return self.settings.layers - 1

    @property
    def calls_per_answer(self) -> int:
        """Model calls one answer takes (first attempts, no early stop): for planning."""
        return len(self.proposers) * self.proposer_layers + 1

    @property
    def aggregator_tags(self) -> tuple[str, ...]:
        return tuple(self._aggregator_call([], {}).tags)

    def proposer_input(
        self, conversation: Sequence[BaseMessage], previous: Sequence[Proposal] | None
    ) -> list[BaseMessage]:
        """Messages for every proposer of a layer: tool parts as text, previous answers injected."""
        history = text_only_history(conversation)
        if previous is None:
            return history
        settings = self.settings
        return inject_references(
            history, answers_of(previous), settings.aggregator_prompt, settings.reference_placement
        )

    def aggregator_input(
        self, conversation: Sequence[BaseMessage], previous: Sequence[Proposal] | None
    ) -> list[BaseMessage]:
        """Messages for the aggregator: the conversation with the last layer's answers injected."""
        if previous is None:
            return list(conversation)
        settings = self.settings
        return inject_references(
            conversation, answers_of(previous), settings.aggregator_prompt,
            settings.reference_placement,
        )  # fmt: skip

    def check_conversation(self, conversation: Sequence[BaseMessage]) -> None:
        if not conversation:
            raise ValueError(
                "MoA got an empty conversation: pass a question string or at least one message"
            )

    def check_quorum(self, proposals: Sequence[Proposal]) -> None:
        """Raise `MoAError` naming every failed proposer when too few answered."""
        ok = sum(p.ok for p in proposals)
        if ok >= self.settings.min_proposers:
            return
        failed = [p for p in proposals if not p.ok]
        layer = proposals[0].layer if proposals else 0
        details = "; ".join(f"{p.label}: {p.error}" for p in failed)
        raise MoAError(
            f"only {ok} of {len(proposals)} proposers answered in layer {layer} "
            f"(min_proposers={self.settings.min_proposers}): {details}",
            failures=failed,
        )

    # ------------------------------------------------------------------ requests
    def layer_close(self) -> LayerClose | None:
        """A fresh early-close rule for one layer (None when every proposer is awaited)."""
        if self.settings.layer_quorum is None:
            return None
        return LayerClose(self.settings.layer_quorum, self.settings.straggler_grace)

    def stop_early(self, proposals: Sequence[Proposal]) -> bool:
        """Whether `early_stop` says the remaining proposer layers can be skipped."""
        predicate = early_stop_predicate(self.settings.early_stop)
        return predicate is not None and bool(predicate(answers_of(proposals)))

    def proposer_call(
        self,
        layer: int,
        index: int,
        messages: Sequence[BaseMessage],
        close: LayerClose | None = None,
    ) -> ModelCall:
        return ModelCall(
            model=self.proposers[index],
            messages=messages,
            role=f"proposer {index + 1}",
            kind="proposer",
            metadata={"moa_layer": layer, "moa_proposer": index},
            run_name=f"moa_proposer_{index + 1}_layer_{layer}",  # 1-based, as people count
            timeout=self.settings.proposer_timeout,
            close=close,
        )

    def _aggregator_call(
        self, messages: Sequence[BaseMessage], options: dict[str, Any]
    ) -> ModelCall:
        """The aggregator request; call-time tools are bound to it alone."""
        given = {k: v for k, v in options.items() if v is not None}
        options = {**self.aggregator_options, **given}
        tool_kwargs = {k: options.pop(k) for k in _TOOL_KWARGS if k in options}
        model: Runnable = self.aggregator
        if "tools" in tool_kwargs:
            model = self.aggregator.bind_tools(tool_kwargs.pop("tools"), **tool_kwargs)  # type: ignore[attr-defined]
        else:
            options.update(tool_kwargs)
        return ModelCall(
            model=model,
            messages=messages,
            role="aggregator",
            kind="aggregator",
            hidden=self.aggregator_hidden,
            metadata={"moa_layer": self.settings.layers},
            run_name="moa_aggregator",
            options=options,
            timeout=self.aggregator_timeout,
            retries=self.aggregator_retries,
        )

    def aggregator_call(
        self,
        conversation: Sequence[BaseMessage],
        layers: Sequence[Sequence[Proposal]],
        options: dict[str, Any] | None = None,
    ) -> ModelCall:
        """The aggregator's request after the given proposer layers."""
        messages = self.aggregator_input(conversation, layers[-1] if layers else None)
        return self._aggregator_call(messages, options or {})

    def proposal(self, layer: int, index: int, result: CallResult) -> Proposal:
        """A `Proposal` from one proposer call's result (failures and empty answers kept)."""
        return _proposal(layer, index, result)

    # ------------------------------------------------------------------ proposers
    def _layer_calls(
        self, layer: int, messages: Sequence[BaseMessage], indices: Sequence[int] | None
    ) -> list[ModelCall]:
        indices = range(len(self.proposers)) if indices is None else indices
        close = self.layer_close()
        return [self.proposer_call(layer, i, messages, close) for i in indices]

    def layer_steps(
        self, layer: int, messages: Sequence[BaseMessage], indices: Sequence[int] | None = None
    ) -> Steps[list[Proposal]]:
        """One proposer layer: the given proposers (default: all) concurrently.

        Failures (and empty answers) are recorded as failed proposals, never raised.
        """
        results = yield self._layer_calls(layer, messages, indices)
        return [self.proposal(layer, r.call.metadata["moa_proposer"], r) for r in results]

    def run_layer(
        self,
        layer: int,
        messages: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[Proposal]:
        """`layer_steps` run now (sync; ``await adrive(engine.layer_steps(...))`` is async)."""
        return drive(self.layer_steps(layer, messages, indices), config)

    def proposal_steps(
        self,
        layer: int,
        index: int,
        messages: Sequence[BaseMessage],
        close: LayerClose | None = None,
    ) -> Steps[Proposal]:
        """One proposer call, for callers that retry it themselves (the graph).

        A failed call raises its `CallError` (at the ``yield``, from the driver); an empty
        answer is a failed `Proposal`. `close` is the layer's shared early-close rule.
        """
        call = self.proposer_call(layer, index, messages, close)
        started = time.perf_counter()
        message = yield call
        return self.proposal(
            layer, index, CallResult(call, message, None, time.perf_counter() - started)
        )

    def failed_proposal(
        self,
        layer: int,
        index: int,
        messages: Sequence[BaseMessage],
        error: calls.CallError,
        latency_s: float,
    ) -> Proposal:
        """The recorded `Proposal` of a proposer call that failed for good."""
        call = self.proposer_call(layer, index, messages)
        return self.proposal(layer, index, CallResult(call, None, error, latency_s))

    def propose_steps(self, conversation: Sequence[BaseMessage]) -> Steps[list[list[Proposal]]]:
        """Every proposer layer, checking the quorum after each (raises `MoAError`)."""
        self.check_conversation(conversation)
        layers: list[list[Proposal]] = []
        for layer in range(1, self.proposer_layers + 1):
            messages = self.proposer_input(conversation, layers[-1] if layers else None)
            proposals = yield from self.layer_steps(layer, messages)
            self.check_quorum(proposals)
            layers.append(proposals)
            if layer < self.proposer_layers and self.stop_early(proposals):
                break
        return layers

    # ------------------------------------------------------------------ whole runs
    def run_steps(
        self, conversation: Sequence[BaseMessage], options: dict[str, Any]
    ) -> Steps[MoAResult]:
        """The whole MoA: proposer layers, then the aggregator (whose failure raises)."""
        layers = yield from self.propose_steps(conversation)
        call = self.aggregator_call(conversation, layers, options)
        started = time.perf_counter()
        aggregate = yield call
        return MoAResult(
            self.final_message(layers, aggregate, time.perf_counter() - started), layers
        )

    def run(
        self,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        **options: Any,
    ) -> MoAResult:
        """The whole MoA (sync): `run_steps` on threads."""
        return drive(self.run_steps(conversation, options), config)

    async def arun(
        self,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        **options: Any,
    ) -> MoAResult:
        """The whole MoA (async): `run_steps` on tasks."""
        return await adrive(self.run_steps(conversation, options), config)

    def stream_steps(
        self, conversation: Sequence[BaseMessage], options: dict[str, Any]
    ) -> Steps[tuple[ModelCall, _Relay]]:
        """The proposer layers of a streamed run; returns the aggregator's request and the
        relay that turns its chunks into MoA chunks."""
        layers = yield from self.propose_steps(conversation)
        return self.aggregator_call(conversation, layers, options), _Relay(self, layers)

    def stream(
        self,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        **options: Any,
    ) -> Iterator[AIMessageChunk]:
        """The whole MoA, the aggregator's tokens as they come (sync).

        The last chunk carries the total usage and ``response_metadata["moa"]``.
        """
        call, relay = drive(self.stream_steps(conversation, options), config)
        for chunk in calls.stream(call, config):
            yield relay.forward(chunk)
        yield relay.closing()

    async def astream(
        self,
        conversation: Sequence[BaseMessage],
        config: RunnableConfig | None = None,
        **options: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """Async `stream`."""
        call, relay = await adrive(self.stream_steps(conversation, options), config)
        async for chunk in calls.astream(call, config):
            yield relay.forward(chunk)
        yield relay.closing()

    # ------------------------------------------------------------------- results
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
            # fewer proposer layers than configured only happens through early_stop
            "early_stop": len(layers) < self.proposer_layers,
        }

    def proposer_usage(self, layers: Sequence[Sequence[Proposal]]) -> UsageMetadata | None:
        return sum_usage([p.usage for proposals in layers for p in proposals])

    def _response_metadata(
        self, layers: Sequence[Sequence[Proposal]], aggregate: BaseMessage | None, latency_s: float
    ) -> dict[str, Any]:
        raw = aggregate.response_metadata if aggregate is not None else {}
        usage = getattr(aggregate, "usage_metadata", None)
        model_name = str(raw.get("model_name") or model_label(self.aggregator))
        response_metadata = final_response_metadata(raw)
        response_metadata["model_name"] = model_name
        response_metadata["moa"] = self.metadata(layers, model_name, usage, latency_s)
        return response_metadata

    def final_message(
        self, layers: Sequence[Sequence[Proposal]], aggregate: AIMessage, latency_s: float
    ) -> AIMessage:
        """The user-facing answer: aggregator content, summed usage, MoA metadata."""
        return AIMessage(
            content=aggregate.content,
            tool_calls=aggregate.tool_calls,
            invalid_tool_calls=aggregate.invalid_tool_calls,
            additional_kwargs=aggregate.additional_kwargs,
            usage_metadata=sum_usage([self.proposer_usage(layers), aggregate.usage_metadata]),
            response_metadata=self._response_metadata(layers, aggregate, latency_s),
        )

    def closing_chunk(
        self,
        layers: Sequence[Sequence[Proposal]],
        merged: AIMessageChunk | None,
        latency_s: float,
    ) -> AIMessageChunk:
        """The last streamed chunk: total usage, final metadata, ``chunk_position='last'``."""
        return AIMessageChunk(
            content="",
            usage_metadata=sum_usage(
                [self.proposer_usage(layers), merged.usage_metadata if merged else None]
            ),
            response_metadata=self._response_metadata(layers, merged, latency_s),
            chunk_position="last",
        )


__all__ = [
    "MoAEngine",
    "MoAResult",
    "Proposal",
    "EarlyStop",
    "agreement",
    "answers_of",
    "proposal_of",
    "early_stop_predicate",
    "normalize_answer",
    "final_response_metadata",
    "sum_usage",
]

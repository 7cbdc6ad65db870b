"""`ChatMoA`: Mixture-of-Agents as a LangChain chat model.

A drop-in `BaseChatModel`: proposers answer concurrently, the aggregator writes the final
answer with their drafts injected. All algorithmic work is delegated to `MoAEngine`; this
class adapts it to LangChain's sync/async/streaming/tool-calling conventions.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any
from uuid import UUID, uuid4

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.callbacks.base import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool
from langchain_core.tracers._streaming import _StreamingCallbackHandler
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.context import _configure_hooks
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from langchain_moa.engine import MoAEngine, final_response_metadata, sum_usage
from langchain_moa.models import model_label, resolve_model
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT


class ChatMoA(BaseChatModel):
    """Mixture-of-Agents chat model.

    Example:
        ```python
        from langchain_moa import ChatMoA

        moa = ChatMoA(
            proposers=["openai:gpt-4o-mini", "anthropic:claude-3-5-haiku-latest"],
            aggregator="openai:gpt-4o",
            layers=2,
        )
        moa.invoke("Explain the CAP theorem in two sentences.")
        ```

    Proposers run concurrently (threads on the sync path, tasks on the async path); the
    aggregator's answer streams token by token. `response_metadata["moa"]` records every
    proposal, and `usage_metadata` sums every call made.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    proposers: list[BaseChatModel] = Field(default_factory=list)
    """Proposer models (instances or `init_chat_model` strings)."""
    aggregator: BaseChatModel
    """The model that writes the final answer (instance or `init_chat_model` string)."""
    layers: int = 2
    """Total layers including the final aggregation; 1 means the aggregator alone."""
    aggregator_prompt: str = DEFAULT_AGGREGATOR_PROMPT
    """Instruction placed before the numbered answers."""
    proposer_timeout: float | None = None
    """Seconds; a proposer not done by then is cancelled and dropped."""
    min_proposers: int = 1
    """A layer with fewer successful answers raises `MoAError`."""

    _engine: MoAEngine = PrivateAttr()

    @field_validator("proposers", mode="before")
    @classmethod
    def _resolve_proposers(cls, value: Any) -> list[BaseChatModel]:
        if value is None:
            return []
        if isinstance(value, (str, BaseChatModel)):
            value = [value]
        return [resolve_model(spec, role=f"proposers[{i}]") for i, spec in enumerate(value)]

    @field_validator("aggregator", mode="before")
    @classmethod
    def _resolve_aggregator(cls, value: Any) -> BaseChatModel:
        return resolve_model(value, role="aggregator")

    @model_validator(mode="after")
    def _build_engine(self) -> ChatMoA:
        self._engine = MoAEngine(
            proposers=tuple(self.proposers),
            aggregator=self.aggregator,
            layers=self.layers,
            aggregator_prompt=self.aggregator_prompt,
            proposer_timeout=self.proposer_timeout,
            min_proposers=self.min_proposers,
        )
        return self

    @classmethod
    def from_recipe(cls, name: str = "local", **overrides: Any) -> ChatMoA:
        """Build a ChatMoA from a named recipe or a config file path (see README)."""
        from langchain_moa.recipes import load_recipe

        return cls(**{**load_recipe(name).chat_moa_kwargs(), **overrides})

    @property
    def engine(self) -> MoAEngine:
        """The shared MoA engine configured like this model."""
        return self._engine

    # ------------------------------------------------------------- identification
    @property
    def _llm_type(self) -> str:
        return "moa"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "proposers": [model_label(m) for m in self.proposers],
            "aggregator": model_label(self.aggregator),
            "layers": self.layers,
            "min_proposers": self.min_proposers,
            "proposer_timeout": self.proposer_timeout,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="moa",
            ls_model_name=str(kwargs.get("model") or model_label(self.aggregator)),
            ls_model_type="chat",
        )
        if stop:
            params["ls_stop"] = stop
        return params

    # ---------------------------------------------------------------- tool calling
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Give tools to the aggregator, so the final message can carry tool calls.

        Proposers answer in text only; tool calls and results already in the history
        reach them rewritten as text (see `references.text_only_history`).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    # ------------------------------------------------------------------- helpers
    @staticmethod
    def _child_config(run_manager: Any) -> RunnableConfig:
        """Config that makes proposer/aggregator calls child runs of this run.

        LLM run managers have no ``get_child``; build the same inheritable manager a
        chain run hands to its children. langchain-core does not pass the run manager
        to ``_stream``/``_astream``, so on those paths the run id and config recorded
        by the public entry points (see `_entered`) are used instead.

        Children get the tracing and streaming handlers only (LangSmith, astream_events,
        LangGraph): a plain callback handler sees ChatMoA as one model call whose usage
        is already the total, so cost accounting never counts a token twice.
        """
        if run_manager is not None:
            manager_cls = (
                AsyncCallbackManager
                if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
                else CallbackManager
            )
            manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
            manager.set_handlers(_for_children(run_manager.inheritable_handlers))
            manager.add_tags(run_manager.inheritable_tags)
            manager.add_metadata(run_manager.inheritable_metadata)
            return {"callbacks": manager}
        active = _ACTIVE_RUN.get()
        if active is None:
            return {}
        run_id, config = active
        manager = CallbackManager.configure(
            inheritable_callbacks=config.get("callbacks"),
            inheritable_tags=config.get("tags"),
            inheritable_metadata=config.get("metadata"),
        )
        manager.set_handlers(_for_children(manager.handlers))
        manager.parent_run_id = run_id
        return {"callbacks": manager}

    # Public entry points: pin the run id so streaming paths can parent their child runs.
    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        config, token = _entered(config)
        try:
            return super().invoke(input, config, **kwargs)
        finally:
            _left(token)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        config, token = _entered(config)
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _left(token)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        config, token = _entered(config)
        try:
            yield from super().stream(input, config, **kwargs)
        finally:
            _left(token)

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        config, token = _entered(config)
        try:
            async for chunk in super().astream(input, config, **kwargs):
                yield chunk
        finally:
            _left(token)

    # --------------------------------------------------------------------- sync
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self._engine
        config = self._child_config(run_manager)
        with _child_context(config):
            layers = engine.propose(messages, config)
            aggregator = engine.aggregator_runnable(stop=stop, **kwargs)
            started = time.perf_counter()
            aggregate = aggregator.invoke(
                engine.aggregator_input(messages, layers[-1] if layers else None),
                engine.aggregator_config(config),
            )
        message = engine.final_message(layers, aggregate, time.perf_counter() - started)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self._engine
        config = self._child_config(run_manager)
        # Child runs are configured when they start: proposers, and the aggregator
        # stream's first step. Only those run with accounting handlers muted, not the
        # caller's code between our yields.
        with _child_context(config):
            layers = engine.propose(messages, config)
            aggregator = engine.aggregator_runnable(stop=stop, **kwargs)
            started = time.perf_counter()
            stream = aggregator.stream(
                engine.aggregator_input(messages, layers[-1] if layers else None),
                engine.aggregator_config(config),
            )
            first = next(stream, None)
        merged: AIMessageChunk | None = None
        for chunk in itertools.chain([first] if first is not None else [], stream):
            piece = _as_chunk(chunk)
            merged = piece if merged is None else merged + piece
            yield ChatGenerationChunk(message=_forwarded(piece))
        yield ChatGenerationChunk(
            message=_closing_chunk(engine, layers, merged, time.perf_counter() - started)
        )

    # -------------------------------------------------------------------- async
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self._engine
        config = self._child_config(run_manager)
        with _child_context(config):
            layers = await engine.apropose(messages, config)
            aggregator = engine.aggregator_runnable(stop=stop, **kwargs)
            started = time.perf_counter()
            aggregate = await aggregator.ainvoke(
                engine.aggregator_input(messages, layers[-1] if layers else None),
                engine.aggregator_config(config),
            )
        message = engine.final_message(layers, aggregate, time.perf_counter() - started)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine = self._engine
        config = self._child_config(run_manager)
        with _child_context(config):  # see _stream
            layers = await engine.apropose(messages, config)
            aggregator = engine.aggregator_runnable(stop=stop, **kwargs)
            started = time.perf_counter()
            stream = aggregator.astream(
                engine.aggregator_input(messages, layers[-1] if layers else None),
                engine.aggregator_config(config),
            )
            first = await anext(stream, None)
        merged: AIMessageChunk | None = None
        if first is not None:
            piece = _as_chunk(first)
            merged = piece
            yield ChatGenerationChunk(message=_forwarded(piece))
        async for chunk in stream:
            piece = _as_chunk(chunk)
            merged = piece if merged is None else merged + piece
            yield ChatGenerationChunk(message=_forwarded(piece))
        yield ChatGenerationChunk(
            message=_closing_chunk(engine, layers, merged, time.perf_counter() - started)
        )


_ACTIVE_RUN: ContextVar[tuple[UUID, RunnableConfig] | None] = ContextVar(
    "langchain_moa_active_run", default=None
)


def _for_children(handlers: list[BaseCallbackHandler]) -> list[BaseCallbackHandler]:
    return [h for h in handlers if isinstance(h, (BaseTracer, _StreamingCallbackHandler))]


@contextmanager
def _child_context(config: RunnableConfig) -> Iterator[None]:
    """The context the proposer and aggregator calls start in.

    - The ambient child config becomes ours: otherwise a parent chain's config (set in
      a context variable) is merged back into child calls by `RunnableBinding`,
      re-attaching handlers and parenting the calls to the chain instead of ChatMoA.
    - Context-registered accounting handlers (e.g. `get_usage_metadata_callback`) are
      hidden: they would add each child's usage on top of the ChatMoA run's total.
      Tracers registered the same way stay active.
    """
    tokens: list[tuple[ContextVar, Token]] = [
        (var_child_runnable_config, var_child_runnable_config.set(config))
    ]
    for var, _inheritable, _handler_class, _env_var in _configure_hooks:
        value = var.get()
        if value is not None and not isinstance(value, BaseTracer):
            tokens.append((var, var.set(None)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            try:
                var.reset(token)
            except ValueError:  # generator finalised in another context
                pass


def _entered(config: RunnableConfig | None) -> tuple[RunnableConfig, Token]:
    """Give this run a known id and remember (id, config) for the streaming paths."""
    config = ensure_config(config)
    run_id = config.get("run_id") or uuid4()
    config = {**config, "run_id": run_id}
    return config, _ACTIVE_RUN.set((run_id, config))


def _left(token: Token) -> None:
    try:
        _ACTIVE_RUN.reset(token)
    except ValueError:  # a generator finalised in another context: nothing to restore
        pass


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
    """Re-emit an aggregator chunk as a ChatMoA chunk (content and tool calls only).

    Identity, usage and response metadata are dropped here and stated once, in the
    closing chunk, so merging the stream yields one id, one `model_name` and one
    usage record (the total over every call).
    """
    return AIMessageChunk(
        content=chunk.content,
        tool_call_chunks=chunk.tool_call_chunks,
        additional_kwargs=chunk.additional_kwargs,
    )


def _closing_chunk(
    engine: MoAEngine,
    layers: list[list[Any]],
    merged: AIMessageChunk | None,
    latency_s: float,
) -> AIMessageChunk:
    """The last chunk: total usage, final response metadata, ``chunk_position='last'``."""
    metadata = merged.response_metadata if merged is not None else {}
    model_name = str(metadata.get("model_name") or model_label(engine.aggregator))
    response_metadata = final_response_metadata(metadata)
    response_metadata["model_name"] = model_name
    response_metadata["moa"] = engine.metadata(
        layers, model_name, merged.usage_metadata if merged is not None else None, latency_s
    )
    return AIMessageChunk(
        content="",
        usage_metadata=sum_usage(
            [engine.proposer_usage(layers), merged.usage_metadata if merged is not None else None]
        ),
        response_metadata=response_metadata,
        chunk_position="last",
    )

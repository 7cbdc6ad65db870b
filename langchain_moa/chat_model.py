"""`ChatMoA`: Mixture-of-Agents as a LangChain chat model.

A drop-in `BaseChatModel`: proposers answer concurrently, the aggregator writes the final
answer with their drafts injected. All algorithmic work is delegated to `MoAEngine`; this
class adapts it to LangChain's sync/async/streaming/tool-calling conventions.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from operator import itemgetter
from typing import Any, Literal
from uuid import UUID, uuid4

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.callbacks.base import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
    ensure_config,
)
from langchain_core.tools import BaseTool
from langchain_core.tracers.base import BaseTracer
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from langchain_moa._compat import (
    StreamingCallbackHandler,
    configure_hooks,
    var_child_runnable_config,
)
from langchain_moa.calls import check_timeout
from langchain_moa.engine import MoAEngine
from langchain_moa.errors import ConfigError
from langchain_moa.models import model_label, resolve_model
from langchain_moa.redaction import redact, register_models
from langchain_moa.settings import MoASettings


class ChatMoA(BaseChatModel, MoASettings):
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

    # The MoA settings (layers, aggregator_prompt, proposer_timeout, min_proposers,
    # layer_quorum, straggler_grace, early_stop, reference_placement) are `MoASettings`'
    # fields, inherited with their validation: declared once for every face.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=False)

    proposers: list[BaseChatModel] = Field(default_factory=list)
    """Proposer models (instances or `init_chat_model` strings)."""
    aggregator: BaseChatModel
    """The model that writes the final answer (instance or `init_chat_model` string)."""

    # LangChain's standard parameters. They describe the model that answers, the
    # aggregator, and apply to it alone: proposers keep their own settings (forcing one
    # temperature on every proposer would remove the diversity MoA relies on).
    temperature: float | None = None
    """The aggregator's sampling temperature (sent with each aggregator call)."""
    max_tokens: int | None = None
    """The longest answer the aggregator may write (sent with each aggregator call)."""
    stop: list[str] | None = None
    """Default stop sequences for the aggregator."""
    timeout: float | None = None
    """Seconds for the aggregator's call (None or inf: no limit)."""
    max_retries: int | None = None
    """Extra attempts for an aggregator call that fails with a transient error."""
    streaming: bool = False
    """Like other chat models: ``invoke`` streams internally (callbacks get tokens)."""
    api_key: SecretStr | None = None
    """Key for members given as model strings (passed to ``init_chat_model``)."""

    def __init__(self, **kwargs: Any) -> None:
        """Refuse unknown arguments and report any bad setting as one line (`ConfigError`)."""
        unknown = sorted(k for k in kwargs if k not in type(self).model_fields)
        if unknown:
            raise ConfigError(_unknown_arguments(unknown, list(type(self).model_fields)))
        super().__init__(**kwargs)  # MoASettings turns pydantic's report into one line

    @model_validator(mode="before")
    @classmethod
    def _resolve_models(cls, data: Any) -> Any:
        """Model strings become chat models (with ``api_key`` when one is given)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        key = data.get("api_key")
        options = {"api_key": key} if key is not None else {}
        proposers = data.get("proposers")
        if proposers is None:
            proposers = []
        elif isinstance(proposers, (str, BaseChatModel)):
            proposers = [proposers]
        data["proposers"] = [
            resolve_model(spec, role=f"proposer {i + 1}", **options)
            for i, spec in enumerate(proposers)
        ]
        if "aggregator" in data:
            data["aggregator"] = resolve_model(data["aggregator"], role="aggregator", **options)
        return data

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, value: float | None) -> float | None:
        return check_timeout(value, "timeout")  # inf: no limit (None)

    @field_validator("max_tokens", "max_retries")
    @classmethod
    def _check_non_negative(cls, value: int | None, info: Any) -> int | None:
        if value is not None and (value < 0 or (info.field_name == "max_tokens" and value < 1)):
            raise ValueError(f"must be {'>= 1' if info.field_name == 'max_tokens' else '>= 0'}")
        return value

    @model_validator(mode="after")
    def _validate_engine(self) -> ChatMoA:
        self.engine  # noqa: B018 - builds (and so validates) the configuration now
        register_models([self])  # its own api_key, if any
        return self

    @classmethod
    def from_recipe(cls, name: str = "local", **overrides: Any) -> ChatMoA:
        """Build a ChatMoA from a named recipe or a config file path (see docs/recipes.md)."""
        from langchain_moa.recipes import load_recipe

        return cls(**{**load_recipe(name).chat_moa_kwargs(), **overrides})

    @property
    def engine(self) -> MoAEngine:
        """The MoA engine for the current field values.

        Derived on every access (it is cheap: no I/O, no validation; the fields were
        validated when this model was built), so ``model_copy(update=...)`` and
        ``configurable_fields`` never leave a stale configuration behind. The model is
        its own `MoASettings`.
        """
        return MoAEngine(
            proposers=tuple(self.proposers),
            aggregator=self.aggregator,
            settings=self,
            aggregator_options=self._aggregator_options(),
            aggregator_timeout=self.timeout,
            aggregator_retries=self.max_retries or 0,
        )

    def _aggregator_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        if self.stop:
            options["stop"] = list(self.stop)
        return options

    # ------------------------------------------------------------- identification
    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Fields as `repr` (and `str`, and LangChain's ``serialized`` payload given to
        callbacks, built from `repr`) shows them: redacted, so members' default headers
        and base-URL passwords never show."""
        for name, value in super().__repr_args__():
            yield name, _Redacted(repr(value))

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
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
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

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """The aggregator's answer as `schema`: by a forced tool call, or a JSON response.

        ``method="function_calling"`` (default) forces the aggregator to call `schema` as
        a tool; ``"json_schema"`` / ``"json_mode"`` send it ``response_format``. An
        answer that does not fit is an error naming the aggregator, never a silent
        ``None`` (with ``include_raw=True`` it is the ``parsing_error``, next to ``raw``).
        """
        if kwargs:
            raise ConfigError(f"with_structured_output got unsupported arguments {kwargs}")
        function = convert_to_openai_tool(schema)["function"]
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            llm = self.bind_tools(
                [schema], tool_choice="any", strict=strict, ls_structured_output_format=traced
            )
            check = _require_tool_call(function["name"], model_label(self.aggregator))
            parser = RunnableLambda(check) | (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_model
                else JsonOutputKeyToolsParser(key_name=function["name"], first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                spec = {"name": function["name"], "schema": function.get("parameters", {})}
                if strict is not None:
                    spec["strict"] = strict
                response_format = {"type": "json_schema", "json_schema": spec}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced)
            parser = (
                PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
            )
        else:
            raise ConfigError(
                f"with_structured_output method must be 'function_calling', 'json_schema' or "
                f"'json_mode', got {method!r}"
            )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [unparsed], exception_key="parsing_error"
        )

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
        active = _ACTIVE_RUN.get()
        config: dict[str, Any] = {}
        if active is not None and active[1].get("max_concurrency"):
            config["max_concurrency"] = active[1]["max_concurrency"]
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
            return {**config, "callbacks": manager}  # type: ignore[typeddict-item]
        if active is None:
            return config  # type: ignore[return-value]
        run_id, parent = active
        manager = CallbackManager.configure(
            inheritable_callbacks=parent.get("callbacks"),
            inheritable_tags=parent.get("tags"),
            inheritable_metadata=parent.get("metadata"),
        )
        manager.set_handlers(_for_children(manager.handlers))
        manager.parent_run_id = run_id
        return {**config, "callbacks": manager}  # type: ignore[typeddict-item]

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

    # ------------------------------------------------------------ sync and async
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        config = self._child_config(run_manager)
        with _child_context(config):
            result = self.engine.run(messages, config, stop=stop, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=result.message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        config = self._child_config(run_manager)
        with _child_context(config):
            result = await self.engine.arun(messages, config, stop=stop, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=result.message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        config = self._child_config(run_manager)
        # Child runs are configured when they start: the proposers and the aggregator
        # stream's first step happen inside the first `next`. Only those run with the
        # accounting handlers muted, not the caller's code between our yields.
        stream = self.engine.stream(messages, config, stop=stop, **kwargs)
        with _child_context(config):
            first = next(stream)
        for chunk in itertools.chain([first], stream):
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        config = self._child_config(run_manager)
        stream = self.engine.astream(messages, config, stop=stop, **kwargs)
        with _child_context(config):  # see _stream
            first = await anext(stream)
        yield ChatGenerationChunk(message=first)
        async for chunk in stream:
            yield ChatGenerationChunk(message=chunk)


class _Redacted:
    """A value whose `repr` is the redacted `repr` of the original."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = redact(text)

    def __repr__(self) -> str:
        return self.text


_ACTIVE_RUN: ContextVar[tuple[UUID, RunnableConfig] | None] = ContextVar(
    "langchain_moa_active_run", default=None
)


def _for_children(handlers: list[BaseCallbackHandler]) -> list[BaseCallbackHandler]:
    return [h for h in handlers if isinstance(h, (BaseTracer, StreamingCallbackHandler))]


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
    for var, _inheritable, _handler_class, _env_var in configure_hooks:
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


def _require_tool_call(name: str, aggregator: str) -> Callable[[AIMessage], AIMessage]:
    def require(message: AIMessage) -> AIMessage:
        if message.tool_calls or message.invalid_tool_calls:
            return message  # invalid calls get the parser's own error
        finish = message.response_metadata.get("finish_reason")
        raise OutputParserException(
            f"ChatMoA: the aggregator ({aggregator}) answered in text instead of calling "
            f"{name!r}"
            + (f" (finish_reason {finish!r})" if finish else "")
            + "; it needs a model that supports tool calling with a forced tool_choice",
            llm_output=message.text,
        )

    return require


def _unknown_arguments(unknown: list[str], known: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"ChatMoA got unknown argument(s): {', '.join(parts)}"

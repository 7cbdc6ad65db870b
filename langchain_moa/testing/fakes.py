"""In-process fake chat models for unit tests of MoA code (yours and ours).

`ScriptedChatModel` records every request it receives (so tests can check the exact
structure MoA sends), answers from a script, can sleep, fail, return empty answers,
stream word by word and report usage, on both the sync and async paths.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field, PrivateAttr

Reply = str | Callable[[list[BaseMessage]], str]


class ScriptedChatModel(BaseChatModel):
    """A fake chat model with scripted replies, latency, failures and usage."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str = "scripted"
    reply: Any = "ok"
    """A string, or a function of the received messages returning a string."""
    delay: float = 0.0
    """Seconds to wait before answering (sleep on sync, asyncio.sleep on async)."""
    token_delay: float = 0.0
    """Seconds between streamed tokens."""
    fail_times: int = 0
    """The first N calls raise `error`."""
    fail_always: bool = False
    error: Exception = Field(default_factory=lambda: RuntimeError("scripted failure"))
    input_tokens: int = 10
    output_tokens: int = 5
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    """Tool calls to return when tools are bound (each: name, args, id)."""

    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _call_kwargs: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    @property
    def calls(self) -> list[list[BaseMessage]]:
        """Every request received, as the list of messages sent, in arrival order."""
        return self._calls

    @property
    def call_kwargs(self) -> list[dict[str, Any]]:
        return self._call_kwargs

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable:
        return self.bind(tools=list(tools), **kwargs)

    # ---------------------------------------------------------------- internals
    def _record(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> int:
        with self._lock:
            self._calls.append([m.model_copy(deep=True) for m in messages])
            self._call_kwargs.append(dict(kwargs))
            return len(self._calls)

    def _answer(self, messages: list[BaseMessage], call_number: int, kwargs: dict) -> AIMessage:
        if self.fail_always or call_number <= self.fail_times:
            raise self.error
        text = self.reply(messages) if callable(self.reply) else str(self.reply)
        stop = kwargs.get("stop")
        for s in stop or []:
            if s in text:
                text = text[: text.index(s)]
        tool_calls = self.tool_calls if kwargs.get("tools") else []
        return AIMessage(
            content=text,
            tool_calls=tool_calls,
            usage_metadata={
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            response_metadata={"model_name": self.model_name, "finish_reason": "stop"},
        )

    @staticmethod
    def _tokens(message: AIMessage) -> list[str]:
        text = message.text
        words = text.split(" ")
        return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)] if text else []

    def _chunks(self, message: AIMessage) -> list[AIMessageChunk]:
        chunks = [AIMessageChunk(content=token) for token in self._tokens(message)]
        chunks.append(
            AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {"name": c["name"], "args": _json(c["args"]), "id": c.get("id"), "index": i}
                    for i, c in enumerate(message.tool_calls)
                ],
                usage_metadata=message.usage_metadata,
                response_metadata=message.response_metadata,
                chunk_position="last",
            )
        )
        return chunks

    # --------------------------------------------------------------------- sync
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        n = self._record(messages, {**kwargs, "stop": stop})
        if self.delay:
            time.sleep(self.delay)
        message = self._answer(messages, n, {**kwargs, "stop": stop})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        n = self._record(messages, {**kwargs, "stop": stop})
        if self.delay:
            time.sleep(self.delay)
        message = self._answer(messages, n, {**kwargs, "stop": stop})
        for i, chunk in enumerate(self._chunks(message)):
            if i and self.token_delay:
                time.sleep(self.token_delay)
            yield ChatGenerationChunk(message=chunk)

    # -------------------------------------------------------------------- async
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        n = self._record(messages, {**kwargs, "stop": stop})
        if self.delay:
            await asyncio.sleep(self.delay)
        message = self._answer(messages, n, {**kwargs, "stop": stop})
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        n = self._record(messages, {**kwargs, "stop": stop})
        if self.delay:
            await asyncio.sleep(self.delay)
        message = self._answer(messages, n, {**kwargs, "stop": stop})
        for i, chunk in enumerate(self._chunks(message)):
            if i and self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield ChatGenerationChunk(message=chunk)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)

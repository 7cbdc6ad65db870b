"""Every private import of langchain-core and langgraph, in one place.

These names are not public API and may move between releases; keeping them here means one
file to fix when they do. Tested with the minimum versions pinned in pyproject.toml (CI
runs the unit tests at those minimums) and with the latest releases.

- `var_child_runnable_config`: the context variable LangChain uses to pass a parent's
  config to runnables called inside it (`ChatMoA` replaces it for its child calls).
- `configure_hooks`: context-registered callback handlers (``get_usage_metadata_callback``
  and tracers); `ChatMoA` hides the accounting ones from child calls.
- `StreamingCallbackHandler`: the handler class behind ``astream_events`` and LangGraph's
  ``stream_mode="messages"``; child runs must still reach it.
- `RunnableCallable`: LangGraph's node wrapper with separate sync and async functions,
  which its own prebuilt agent uses.
- `node_attempt`: the attempt number of the running node (1-based) for retry decisions.
- `environ_snapshot`: the standard library's raw mapping behind ``os.environ``, so the
  redactor can tell in under a microsecond whether the environment changed.
- `plain_validation_init`: pydantic's marker of its own ``BaseModel.__init__``, so a model
  whose ``__init__`` only rewords errors is still validated without it by
  ``model_validate`` (a config file keeps pydantic's structured errors and its context).
"""

from __future__ import annotations

import os
from typing import Any

from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tracers._streaming import (
    _StreamingCallbackHandler as StreamingCallbackHandler,
)
from langchain_core.tracers.context import _configure_hooks as configure_hooks
from langgraph._internal._runnable import RunnableCallable


def environ_snapshot() -> dict[Any, Any] | None:
    """``os.environ``'s raw mapping (compare it with a copy to detect a change), or None."""
    raw = getattr(os.environ, "_data", None)
    return raw if isinstance(raw, dict) else None


def plain_validation_init(init: Any) -> Any:
    """Mark a pydantic model's ``__init__`` as one ``model_validate`` need not call.

    Pydantic calls an overridden ``__init__`` from ``model_validate`` too (a "custom init"),
    without the validation context; an ``__init__`` that only turns the `ValidationError`
    of direct construction into one line is not needed there.
    """
    init.__pydantic_base_init__ = True
    return init


def node_attempt(runtime: Any) -> int:
    """The running LangGraph node's attempt number (1 on the first try)."""
    return int(runtime.execution_info.node_attempt)


__all__ = [
    "RunnableCallable",
    "StreamingCallbackHandler",
    "configure_hooks",
    "environ_snapshot",
    "node_attempt",
    "plain_validation_init",
    "var_child_runnable_config",
]

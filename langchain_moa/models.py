"""Turning user model specs into chat models, and naming them.

A spec is either a `BaseChatModel` instance or a string understood by LangChain's
`init_chat_model` (``"openai:gpt-4o-mini"``). Resolution errors become one-line
`ConfigError`s raised at construction, before any request is made.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel

from langchain_moa.errors import ConfigError
from langchain_moa.redaction import redact

ModelSpec = BaseChatModel | str


def resolve_model(spec: Any, *, role: str, **options: Any) -> BaseChatModel:
    """Return a chat model for `spec`, or raise a `ConfigError` that names `role`.

    `options` (e.g. ``api_key``) are passed to ``init_chat_model`` for model strings.
    """
    if isinstance(spec, BaseChatModel):
        return spec
    if isinstance(spec, str):
        if not spec.strip():
            raise ConfigError(f"{role}: empty model string; use e.g. 'openai:gpt-4o-mini'")
        try:
            from langchain.chat_models import init_chat_model
        except ImportError as exc:  # pragma: no cover - langchain is a dependency
            raise ConfigError(f"{role}: model strings need the 'langchain' package") from exc
        try:
            return init_chat_model(spec, **options)
        except Exception as exc:  # provider-specific errors: unknown provider, missing key...
            first_line = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(
                f"{role}: cannot create model {spec!r}: {type(exc).__name__}: {first_line}"
            ) from None
    raise ConfigError(
        f"{role}: expected a BaseChatModel or a model string like 'openai:gpt-4o-mini', "
        f"got {type(spec).__name__}"
    )


def model_label(model: BaseChatModel) -> str:
    """A short human-readable name for a chat model (its model name when it has one)."""
    model = getattr(model, "bound", model)  # a RunnableBinding around a chat model
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return getattr(model, "_llm_type", type(model).__name__)


_BASE_URL_FIELDS = ("openai_api_base", "base_url", "api_base", "endpoint", "azure_endpoint")


def model_endpoint(model: Any) -> str | None:
    """``scheme://host[:port]`` of the server a chat model calls, for error messages.

    Only the origin: never the userinfo (``user:password@``), path or query string (either
    may hold a key). None when the model names no HTTP(S) base URL (the default endpoint of
    a hosted provider, an in-process model).
    """
    from urllib.parse import urlsplit

    while hasattr(model, "bound"):  # RunnableBinding(s) around a chat model
        model = model.bound
    for attr in _BASE_URL_FIELDS:
        value = getattr(model, attr, None)
        if isinstance(value, str) and "://" in value:
            try:
                parts = urlsplit(value.strip())
                host, port = parts.hostname, parts.port
            except ValueError:  # a malformed URL: nothing safe to show
                return None
            if parts.scheme not in ("http", "https") or not host:
                return None
            host = f"[{host}]" if ":" in host else host
            return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
    return None

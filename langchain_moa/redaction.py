"""Keep credentials out of error texts, metadata and logs.

Provider SDKs sometimes echo part of a key in their error messages; every error string
langchain-moa records or raises passes through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import SecretStr

_PATTERNS = [
    re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}"),  # OpenAI-style keys, even partially masked
    re.compile(r"\bhf_[A-Za-z0-9]{6,}"),  # Hugging Face tokens
    re.compile(r"(?i)\b(bearer|api[-_ ]?key|token)([\"':= ]+)[A-Za-z0-9_\-.]{8,}"),
]


def secret_values(objects: Iterable[object]) -> list[str]:
    """Collect the plain values of every `SecretStr` field held by the given models."""
    values: list[str] = []
    for obj in objects:
        for value in getattr(obj, "__dict__", {}).values():
            if isinstance(value, SecretStr):
                plain = value.get_secret_value()
                if plain and len(plain) >= 4:
                    values.append(plain)
    return values


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace known secret values and anything shaped like a key with `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    for pattern in _PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
        else:
            text = pattern.sub("***", text)
    return text

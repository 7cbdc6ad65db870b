"""Keep credentials out of everything the package shows: errors, logs, CLI output, files.

Providers echo the caller's key in their 401s ("Incorrect API key provided: KEY"), and key
shapes vary too much for patterns alone. So redaction works by *value* first: every secret
the package has seen is remembered in a process-wide set, and `redact` replaces each known
value before a pattern net catches shapes it has not seen. What is registered:

- every `SecretStr` held by a model in play, and plain string fields named like keys or
  tokens (any provider class; bound models are unwrapped) — see `register_models`;
- the values of the environment variables a recipe or config names (`register_env`);
- ``HF_TOKEN`` and any environment variable named like a credential, read at redaction
  time (``*_KEY``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*CREDENTIAL*``).

`RedactingFilter` applies the same to log records; the CLI installs it on every handler.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from typing import Any

from pydantic import SecretStr

MASK = "***"
_MIN_SECRET = 6

_PATTERNS = [
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), and other sk-/pk-/rk- keys, even masked
    re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*]{6,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{6,}"),  # Hugging Face
    re.compile(r"\bgsk_[A-Za-z0-9]{6,}"),  # Groq
    re.compile(r"\btgp_v1_[A-Za-z0-9_\-]{6,}"),  # Together
    re.compile(r"\bAIza[A-Za-z0-9_\-]{10,}"),  # Google
    re.compile(r"\b(?:xox[abpr]|ghp|gho|github_pat|glpat)[-_][A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,64}(?![A-Za-z0-9])"),  # plain hex keys
    # a value after a label, with at least one digit (so "API key provided" stays prose)
    re.compile(
        r"(?i)\b(bearer|api[-_ ]?key|token|authorization)([\"':= ]+)"
        r"(?=[A-Za-z_\-.]*\d)[A-Za-z0-9_\-.]{8,}"
    ),
]
_CREDENTIAL_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AUTH", re.IGNORECASE)
_SECRET_FIELD = re.compile(r"(api_?key|token|secret|password|credential)", re.IGNORECASE)

_known: set[str] = set()
_known_env_names: set[str] = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
_lock = threading.Lock()


def _plain(value: Any) -> str | None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str) and len(value.strip()) >= _MIN_SECRET:
        return value.strip()
    return None


def secrets_of(obj: Any) -> list[str]:
    """The secret values a model (or a bound model, or a list of them) holds.

    Looks at `SecretStr` fields of any name and plain strings in fields named like
    credentials; follows ``.bound`` (RunnableBinding) and default headers.
    """
    found: list[str] = []
    seen: set[int] = set()

    def walk(item: Any, depth: int) -> None:
        if item is None or depth > 3 or id(item) in seen:
            return
        seen.add(id(item))
        if isinstance(item, (list, tuple)):
            for element in item:
                walk(element, depth + 1)
            return
        fields = getattr(item, "__dict__", None)
        if not isinstance(fields, dict):
            return
        for name, value in fields.items():
            if isinstance(value, SecretStr) or (
                isinstance(value, str) and _SECRET_FIELD.search(name)
            ):
                plain = _plain(value)
                if plain:
                    found.append(plain)
            elif name in ("default_headers", "headers") and isinstance(value, dict):
                found.extend(p for v in value.values() if (p := _plain(v)))
        walk(fields.get("bound"), depth + 1)

    walk(obj, 0)
    return found


def register_secrets(values: Iterable[str | SecretStr | None]) -> None:
    """Remember secret values so that `redact` removes them from now on."""
    plain = {p for v in values if (p := _plain(v))}
    if plain - _known:
        with _lock:
            _known.update(plain)


def register_models(models: Iterable[Any]) -> None:
    """Remember every secret the given models hold (see `secrets_of`)."""
    register_secrets(s for model in models for s in secrets_of(model))


def register_env(*names: str | None) -> None:
    """Treat these environment variables' values as secrets (a config's ``api_key_env``)."""
    new = {n for n in names if n} - _known_env_names
    if new:
        with _lock:
            _known_env_names.update(new)


def known_secrets(extra: Iterable[str] = ()) -> list[str]:
    """Every value to remove, longest first (so a key containing another goes whole)."""
    values = set(_known)
    for name, value in os.environ.items():
        if name in _known_env_names or _CREDENTIAL_ENV.search(name):
            plain = _plain(value)
            if plain:
                values.add(plain)
    values.update(p for v in extra if (p := _plain(v)))
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret value, then anything shaped like a key, masked."""
    if not text:
        return text
    for secret in known_secrets(secrets):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
        else:
            text = pattern.sub(MASK, text)
    return text


def looks_like_secret(text: str) -> bool:
    """True when `text` has the shape of a key or token (the pattern net alone)."""
    return any(pattern.search(text) for pattern in _PATTERNS)


def one_line(text: str, limit: int = 500, *, whole: bool = False) -> str:
    """The first non-empty line of `text`, redacted and shortened to `limit` characters.

    With ``whole=True`` every line is kept, joined by single spaces (error records that
    must be complete yet fit on one line).
    """
    if whole:
        joined = " ".join(redact(str(text)).split())
        return joined if len(joined) <= limit else joined[: limit - 1] + "…"
    for line in redact(str(text)).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def run_error_line(error: Any) -> str:
    """A tracer run's error text (``repr(exc)`` + traceback) as ``Type: text`` on one line."""
    text = str(error or "").split("Traceback (most recent call last)")[0].strip()
    match = re.fullmatch(r"(\w+)\((['\"])(.*)\2\)", text, re.DOTALL)
    if match:  # RuntimeError('boom') -> RuntimeError: boom
        text = f"{match.group(1)}: {match.group(3)}"
    return one_line(text, whole=True) or "error"


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message and any exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add `RedactingFilter` to every handler of `logger` (root by default) and to it."""
    target = logger or logging.getLogger()
    for holder in [target, *target.handlers]:
        if not any(isinstance(f, RedactingFilter) for f in holder.filters):
            holder.addFilter(RedactingFilter())

"""Keep credentials out of everything the package shows: errors, logs, CLI output, files.

Providers echo the caller's key in their 401s ("Incorrect API key provided: KEY"), and key
shapes vary too much for patterns alone. So redaction works by *value* first: every secret
the package has seen is remembered in a process-wide set, and `redact` replaces each known
value before a pattern net catches shapes it has not seen. What is registered:

- every `SecretStr` held by a model in play, plain string fields named like keys or tokens,
  the password in any URL field's userinfo (``http://user:KEY@host/v1``), and credentials
  in default headers or query parameters (any provider class; bound models are
  unwrapped) — see `register_models`;
- the values of the environment variables a recipe or config names (`register_env`);
- ``HF_TOKEN`` and any environment variable named like a credential, read at redaction
  time (``*_KEY``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*CREDENTIAL*``).

Two nets follow for shapes never seen: patterns for known key formats and random-looking
tokens (`redact`), and ``scheme://user:***@host`` for any URL carrying a password.

Answers are different: a model's text may legitimately hold hex digests or long
identifiers, so `mask_values` (used by the call layer on every answer, and on what
tracers receive) removes known secret *values* only, never by pattern.

`RedactingFilter` applies `redact` to log records. Importing this module installs it on
the loggers of the HTTP stacks providers use (`install_library_log_redaction`), which
print request details at DEBUG; the CLI also installs it on every handler.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from langchain_moa._compat import environ_snapshot

MASK = "***"
_MIN_SECRET = 6

_KEY_LABEL = r"(?i)\b(bearer|basic|api[-_ ]?key|token|authorization|password|secret)"
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # a password in a URL's userinfo, whatever its shape: scheme://user:***@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@]*):([^\s/@]+)@"), rf"\1:{MASK}@"),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), and other sk-/pk-/rk- keys, even masked
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*]{6,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{6,}"), MASK),  # Hugging Face
    (re.compile(r"\bgsk_[A-Za-z0-9]{6,}"), MASK),  # Groq
    (re.compile(r"\btgp_v1_[A-Za-z0-9_\-]{6,}"), MASK),  # Together
    (re.compile(r"\bAIza[A-Za-z0-9_\-]{10,}"), MASK),  # Google
    (re.compile(r"\b(?:xox[abpr]|ghp|gho|github_pat|glpat)[-_][A-Za-z0-9_\-]{8,}"), MASK),
    (re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,64}(?![A-Za-z0-9])"), MASK),  # plain hex keys
    # a random-looking token of unknown shape: 20+ letters and digits standing alone, with
    # upper case, lower case and a digit (identifiers, model and error names have none or
    # are joined by - _ .)
    (
        re.compile(
            r"(?<![A-Za-z0-9_\-.])(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])"
            r"[A-Za-z0-9]{20,}(?![A-Za-z0-9_\-.])"
        ),
        MASK,
    ),
    # a value after a label, with at least one digit (so "API key provided" stays prose)
    (
        re.compile(_KEY_LABEL + r"([\"':= ]+)(?=[A-Za-z_\-.+/=]*\d)[A-Za-z0-9_\-.+/=]{8,}"),
        rf"\1\2{MASK}",
    ),
]
_CREDENTIAL_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AUTH", re.IGNORECASE)
# "tiktoken_model_name", "max_tokens", "tokenizer" are settings, not credentials
_SECRET_FIELD = re.compile(
    r"(api_?key|(?<!tik)token(?!s|izer)|secret|password|credential)", re.IGNORECASE
)
_CREDENTIAL_NAME = re.compile(
    r"key|token|secret|password|passwd|credential|auth|cookie|session|signature", re.IGNORECASE
)
_TOKEN_LIKE = re.compile(r"(?=[^\s]*\d)(?=[^\s]*[A-Za-z])[^\s]{16,}")
_URL_USERINFO = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s/@]+@[^\s]*")
_MIN_ANSWER_SECRET = 16
"""A value this long (without spaces) is masked in answers whatever its characters."""
_MIN_ANSWER_KEY = 8
"""A shorter value is masked in answers only with both letters and digits (see
`answer_secrets`)."""

_known: set[str] = set()
_known_env_names: set[str] = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
_lock = threading.Lock()


def _plain(value: Any) -> str | None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str) and len(value.strip()) >= _MIN_SECRET:
        return value.strip()
    return None


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries in its userinfo: the password (raw and decoded), the
    user when it stands alone (``https://TOKEN@host``) or looks like a key, and the
    Basic credential an HTTP client builds from them."""
    found: list[str] = []
    for match in _URL_USERINFO.finditer(url):
        try:
            parts = urlsplit(match.group(0))
            user, password = parts.username, parts.password
        except ValueError:
            continue
        if password:
            found += [password, unquote(password)]
            pair = f"{unquote(user or '')}:{unquote(password)}"
            found.append(base64.b64encode(pair.encode()).decode())
        if user and (not password or looks_like_secret(user) or _TOKEN_LIKE.fullmatch(user)):
            found += [user, unquote(user)]
    return [p for v in found if (p := _plain(v))]


def _header_secrets(name: str, value: Any) -> list[str]:
    """Credentials in one header or query parameter: by its name, or by the value's shape."""
    plain = _plain(value)
    if not plain:
        return []
    if not (_CREDENTIAL_NAME.search(name) or looks_like_secret(plain) or _TOKEN_LIKE.search(plain)):
        return url_secrets(plain)
    found = [plain]
    scheme, _, credential = plain.partition(" ")
    if credential.strip():  # "Bearer KEY", "Basic dXNlcjpLRVk="
        found.append(credential.strip())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            found.append(decoded.partition(":")[2])
    return [p for v in found if (p := _plain(v))]


def _mapping_secrets(values: dict[Any, Any], depth: int = 0) -> list[str]:
    found: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict) and depth < 2:  # model_kwargs={"extra_headers": {...}}
            found += _mapping_secrets(value, depth + 1)
        elif isinstance(value, (str, SecretStr)):
            found += _header_secrets(str(key), value)
    return found


_MAPPING_FIELD = re.compile(r"header|query|params|model_kwargs|extra_body", re.IGNORECASE)


def secrets_of(obj: Any) -> list[str]:
    """The secret values a model (or a bound model, or a list of them) holds.

    Looks at `SecretStr` fields of any name, plain strings in fields named like
    credentials, URL fields' userinfo (``base_url``, ``openai_api_base``, a proxy...),
    and credentials in header or query mappings (``default_headers``,
    ``default_query``, ``model_kwargs["extra_headers"]``); follows ``.bound``
    (RunnableBinding).
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
                    found.extend(url_secrets(plain))
            elif isinstance(value, str):
                if "@" in value and "://" in value:
                    found.extend(url_secrets(value))
            elif isinstance(value, dict) and _MAPPING_FIELD.search(name):
                found.extend(_mapping_secrets(value))
            elif type(value).__name__ == "URL" and "@" in str(value):  # httpx.URL
                found.extend(url_secrets(str(value)))
        walk(fields.get("bound"), depth + 1)

    walk(obj, 0)
    return found


def register_secrets(values: Iterable[str | SecretStr | None]) -> None:
    """Remember secret values so that `redact` removes them from now on."""
    plain = {p for v in values if (p := _plain(v))}
    if plain - _known:
        with _lock:
            _known.update(plain)


_registered: dict[int, weakref.ref] = {}


def register_models(models: Iterable[Any], *, again: bool = False) -> None:
    """Remember every secret the given models hold (see `secrets_of`).

    A model already registered is not walked again (the call layer registers each call's
    model: about 40 us saved per call) unless `again` (a failure re-reads the model, in
    case its settings changed since).
    """
    for model in models:
        if model is None:
            continue
        ref = _registered.get(id(model))
        if not again and ref is not None and ref() is model:
            continue
        register_secrets(secrets_of(model))
        try:
            key = id(model)
            _registered[key] = weakref.ref(model, lambda _, key=key: _registered.pop(key, None))
        except TypeError:  # not weak-referenceable: walked every time
            pass


def register_env(*names: str | None) -> None:
    """Treat these environment variables' values as secrets (a config's ``api_key_env``)."""
    new = {n for n in names if n} - _known_env_names
    if new:
        with _lock:
            _known_env_names.update(new)


_env_cache: tuple[Any, frozenset[str], tuple[str, ...]] | None = None


def _env_secrets() -> tuple[str, ...]:
    """Credential values in the environment; recomputed only when the environment changed.

    Reading ``os.environ`` decodes every variable (about 100 us); comparing its raw
    mapping with the last snapshot takes under a microsecond.
    """
    global _env_cache
    raw = environ_snapshot()
    cached = _env_cache
    if (
        raw is not None
        and cached is not None
        and cached[0] == raw
        and (cached[1] == _known_env_names)
    ):
        return cached[2]
    names = frozenset(_known_env_names)
    values = tuple(
        plain
        for name, value in os.environ.items()
        if (name in names or _CREDENTIAL_ENV.search(name)) and (plain := _plain(value))
    )
    if raw is not None:
        _env_cache = (dict(raw), names, values)
    return values


def known_secrets(extra: Iterable[str] = ()) -> list[str]:
    """Every value to remove, longest first (so a key containing another goes whole)."""
    values = set(_known)
    values.update(_env_secrets())
    values.update(p for v in extra if (p := _plain(v)))
    return sorted(values, key=len, reverse=True)


def _answer_worthy(value: str) -> bool:
    """Whether a secret value is masked in answers, not only in errors and logs.

    Placeholder keys of local servers (``ollama``, ``lm-studio``, ``not-needed``) and
    settings in variables named like credentials (``KEYBOARD_LAYOUT=enabled-intl``) are
    words an answer may use; a key has 16 characters or more, or mixes letters and digits.
    """
    if any(c.isspace() for c in value):
        return False
    if len(value) >= _MIN_ANSWER_SECRET:
        return True
    return (
        len(value) >= _MIN_ANSWER_KEY
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
    )


_answer_cache: tuple[int, tuple[str, ...], tuple[str, ...]] | None = None


def answer_secrets() -> tuple[str, ...]:
    """The values `mask_values` removes from answers, longest first.

    Every value registered (models' keys, base-URL passwords, header credentials), the
    variables a config names and the variables named like credentials, each if it looks
    like a key (`_answer_worthy`). Cached until a secret or the environment changes.
    """
    global _answer_cache
    env = _env_secrets()
    cached = _answer_cache
    if cached is not None and cached[0] == len(_known) and cached[1] is env:
        return cached[2]
    values = {v for v in _known if _answer_worthy(v)}
    values.update(v for v in env if _answer_worthy(v))
    result = tuple(sorted(values, key=len, reverse=True))
    _answer_cache = (len(_known), env, result)  # holds `env`: its id is not reused
    return result


def mask_values(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of `secrets` (longest first) replaced by the mask; no patterns."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_urls(text: str) -> str:
    """`text` with the password of every URL's userinfo masked: ``scheme://user:***@host``."""
    if "@" not in text or "://" not in text:
        return text
    pattern, replacement = _PATTERNS[0]
    return pattern.sub(replacement, text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret value, then anything shaped like a key, masked."""
    if not text:
        return text
    for secret in known_secrets(secrets):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def looks_like_secret(text: str) -> bool:
    """True when `text` has the shape of a key or token (the pattern net alone)."""
    return any(pattern.search(text) for pattern, _ in _PATTERNS)


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


LIBRARY_LOGGERS = (
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
    "httpcore2",
    "httpcore2.connection",
    "httpcore2.http11",
    "httpcore2.http2",
    "httpcore2.proxy",
    "httpcore2.socks",
    "openai",
    "openai._base_client",
    "openai._response",
    "anthropic",
    "anthropic._base_client",
    "urllib3",
    "urllib3.connectionpool",
    "requests",
    "langsmith",
    "langsmith.client",
    "langchain_moa",
)
"""Loggers whose records show requests (URLs with their userinfo at INFO; headers and
bodies at DEBUG), and every child logger of their libraries: filtered."""

_LIBRARY_PREFIXES = frozenset(name.split(".")[0] for name in LIBRARY_LOGGERS)
_loggers_seen = -1


def install_library_log_redaction() -> None:
    """Add `RedactingFilter` to the loggers of the HTTP stacks providers use.

    A logger's filters see only the records logged on it, never its children's, so each
    logger in `LIBRARY_LOGGERS` gets one (created now if its library is not imported
    yet: the library then finds it), and so does every existing child logger of those
    libraries. The filter works whatever handlers the application configures later
    (``logging.basicConfig(level=logging.DEBUG)`` included).
    """
    global _loggers_seen
    names = set(LIBRARY_LOGGERS)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in _LIBRARY_PREFIXES:
            names.add(name)
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    _loggers_seen = len(logging.root.manager.loggerDict)


def keep_library_log_redaction() -> None:
    """Cover loggers created since the last look (a library imported later): the call
    layer runs this before every call; it costs a length comparison when none were."""
    if len(logging.root.manager.loggerDict) != _loggers_seen:
        install_library_log_redaction()


install_library_log_redaction()

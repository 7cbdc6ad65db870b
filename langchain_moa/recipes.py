"""Recipes: named, documented MoA configurations, and user config files.

A recipe says which models propose, which aggregates, how many layers, and how each model
is reached (any OpenAI-compatible endpoint, or the embedded local model). Models are built
only when asked for (`Recipe.build_models`), and API keys are read from the environment at
that moment, so loading or listing a recipe never needs a key, and a recipe never holds one
(only the *name* of the variable that does).

Shipped recipes:

- ``local`` (default): Self-MoA on the bundled SmolLM2-135M-Instruct. Self-MoA (arXiv
  2502.00674) found that sampling one model several times and aggregating beats mixing
  different models (+6.6 points on AlpacaEval 2.0); with a single embedded model that is
  also the only MoA that runs offline. Three samples at different temperatures and seeds
  propose, a low-temperature sample aggregates. Answers in seconds on 2 CPU cores.
- ``together-moa``: the MoA paper's 3-layer shape (two proposer layers, then the
  aggregator) on Together's OpenAI-compatible API (key in ``TOGETHER_API_KEY``), with
  currently served open models in place of the paper's (Qwen1.5-110B-Chat, WizardLM-2-8x22B,
  dbrx-instruct and others are no longer served).
- ``together-moa-lite``: the 2-layer MoA-Lite shape on the same models.

Config files (TOML or YAML) describe any OpenAI-compatible endpoints; see docs/recipes.md.
`ModelEntry` and `Recipe` are frozen pydantic models with ``extra="forbid"``: the schema is
the one place that says which fields exist and what they hold, so a typo or a stray field is
refused instead of silently ignored. Strict types keep ``layers = true`` or ``"5"`` from
passing as numbers. Every mistake in a config file is a one-line `ConfigError` naming the
file and the field (pydantic's multi-line `ValidationError` is turned into that line here).
Every number has a documented range (`RANGES`), so ``layers = 10**400`` or ``timeout =
1e-300`` is refused at load, not found out by hundreds of calls. A message repeats a value
only when it cannot be a key (numbers, and short plain words: see `_could_be_secret`), and
is redacted besides, so a key pasted into the wrong field is never echoed.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from langchain_moa.errors import ConfigError
from langchain_moa.redaction import redact, register_env
from langchain_moa.settings import MoASettings
from langchain_moa.settings import could_be_secret as _could_be_secret
from langchain_moa.settings import shown as _shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOGETHER_BASE_URL = "https://api.together.xyz/v1"
TOGETHER_KEY_ENV = "TOGETHER_API_KEY"
Provider = Literal["openai-compatible", "local"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

# Fields people reach for that would put a secret in a file: refuse them with a pointer.
_SECRET_FIELDS = {"api_key", "key", "token", "openai_api_key", "password", "secret"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The range of every number a config may set (inclusive), named in the error that refuses
# a value outside it. Wide enough for any real use, narrow enough that a typo or a pasted
# value cannot start thousands of calls or time out every request.
MAX_LAYERS = 10
"""The MoA paper's gains level off after 3-4 layers; each layer is a round of calls."""
MAX_PROPOSERS = 64
"""Proposers (judges) per layer; also the ceiling of min_proposers and layer_quorum."""
MAX_TOKENS = 1_000_000
MIN_TIMEOUT = 0.1
"""Seconds: below this no request can be answered (1e-300 would fail every call)."""
MAX_TIMEOUT = 86_400.0
"""Seconds: one day."""
MAX_GRACE = 100.0
MIN_SAMPLES, MAX_SAMPLES = 2, 32
"""`moa label` candidates per prompt (pairwise judging costs samples squared)."""
SEED_RANGE = (-(2**63), 2**63 - 1)

RANGES: dict[str, str] = {
    "layers": f"an integer from 1 to {MAX_LAYERS}",
    "min_proposers": f"an integer from 1 to {MAX_PROPOSERS}",
    "layer_quorum": f"an integer from 1 to {MAX_PROPOSERS}",
    "proposer_timeout": f"a number of seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g}, or inf "
    "for no limit",
    "straggler_grace": f"a number from 0 to {MAX_GRACE:g}",
    "samples": f"an integer from {MIN_SAMPLES} to {MAX_SAMPLES}",
    "temperature": "a number from 0 to 2",
    "max_tokens": f"an integer from 1 to {MAX_TOKENS}",
    "seed": "a 64-bit integer (from -2**63 to 2**63 - 1)",
    "timeout": f"a number of seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g}",
    "frequency_penalty": "a number from -2 to 2",
}
"""What each numeric field accepts, as its error message says it (docs/recipes.md too)."""

_FILE_RANGES: dict[str, tuple[float, float]] = {
    "layers": (1, MAX_LAYERS),
    "min_proposers": (1, MAX_PROPOSERS),
    "layer_quorum": (1, MAX_PROPOSERS),
    "proposer_timeout": (MIN_TIMEOUT, MAX_TIMEOUT),
    "straggler_grace": (0, MAX_GRACE),
}
"""The MoA settings' ranges in a recipe (`MoASettings` checks their types and signs)."""

# StrictFloat takes ints (30 means 30.0) but neither bools nor numeric strings; no inf/nan.
_Seconds = Annotated[StrictFloat, Field(ge=MIN_TIMEOUT, le=MAX_TIMEOUT, allow_inf_nan=False)]

def _hide_secrets(text: str) -> str:
    """A parser's message with every quoted part that could be a key left out."""

    def hide(match: re.Match[str]) -> str:
        return "'...'" if _could_be_secret(match.group(0)[1:-1]) else match.group(0)

    return re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", hide, text)


def _config_error(message: str) -> ConfigError:
    """The one-line, redacted `ConfigError` every mistake in this module becomes.

    Redacted because a key pasted into the wrong field (``model``, ``description``, a
    recipe name...) would otherwise be echoed to the terminal or a log.
    """
    return ConfigError(redact(" ".join(message.splitlines())))


class _FieldError(ValueError):
    """A cross-field check's failure, pinned to the field it is about.

    A model validator's error is located at the model itself; `field` lets the message
    name ``aggregator.base_url`` rather than just ``aggregator``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(redact(message))
        self.field = field


class ModelEntry(BaseModel):
    """How to reach one model: an OpenAI-compatible endpoint, or the embedded local server.

    Holds the *name* of the environment variable with the key, never the key, so a recipe
    can be printed, logged or put in an error message safely.
    """

    # hide_input_in_errors: a ValidationError from direct construction must not echo a
    # value either (api_key_env might be a pasted key).
    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, use_attribute_docstrings=True
    )

    model: StrictStr | None = None
    """Model name at the endpoint; for provider "local", a GGUF path / HF file / None (SmolLM2)."""
    base_url: StrictStr | None = None
    """The endpoint's OpenAI-compatible base URL (http:// or https://)."""
    api_key_env: StrictStr | None = None
    """Name of the environment variable holding the key (never the key itself)."""
    temperature: Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    provider: Provider = "openai-compatible"
    timeout: _Seconds | None = None
    """Seconds for one HTTP request (the client's own timeout)."""
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    """OpenAI's frequency_penalty (-2 to 2): > 0 discourages repeating the same tokens."""

    @field_validator("api_key_env")
    @classmethod
    def _is_a_variable_name(cls, value: str | None) -> str | None:
        # The message never quotes the value: it may well be the key itself. Keys such as
        # gsk_... or AIza... or 20 random letters and digits are valid identifiers, so what
        # could be a key is refused too (later messages would otherwise name the
        # "variable"). Shapes only, not known values, so whether a name is valid does not
        # depend on the environment.
        if value is not None and (
            not _ENV_NAME.fullmatch(value) or len(value) > 64 or _could_be_secret(value)
        ):
            raise ValueError(
                "must be the NAME of an environment variable (e.g. TOGETHER_API_KEY), "
                "not the key itself"
            )
        return value

    @model_validator(mode="after")
    def _endpoint_is_complete(self) -> ModelEntry:
        """An endpoint needs a model name and an http(s) URL; the local model needs neither."""
        if self.provider == "local":
            return self
        if not self.model:
            raise _FieldError("model", "missing (the model name at the endpoint)")
        if not self.base_url:
            raise _FieldError(
                "base_url",
                'missing (e.g. https://api.together.xyz/v1), or set provider = "local" for '
                "the embedded model",
            )
        problem = _base_url_problem(self.base_url)
        if problem:
            raise _FieldError("base_url", problem)
        return self

    @property
    def label(self) -> str:
        """A short name for messages: the model, or the embedded model's alias."""
        if self.model:
            return self.model
        return "local SmolLM2" if self.provider == "local" else "model"

    def _named(self, where: str) -> str:
        """`where` with the model in brackets, unless the model name could be a key."""
        label = self.label
        return f"{where} ({label})" if not _could_be_secret(label) else where

    def build(self, where: str = "model") -> Any:
        """A chat model for this entry; the key is read from the environment now.

        Raises a one-line `ConfigError` naming `where`, the model and the variable when a
        needed key is not set (the value is never shown). The variable is registered with
        `langchain_moa.redaction` first, so its value is masked in every later error and
        log line, whatever provider echoes it.
        """
        if self.provider == "local":
            from langchain_moa.local import local_chat_model

            kwargs: dict[str, Any] = {}
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            if self.max_tokens is not None:
                kwargs["max_tokens"] = self.max_tokens
            if self.timeout is not None:
                kwargs["timeout"] = self.timeout
            if self.frequency_penalty is not None:
                kwargs["frequency_penalty"] = self.frequency_penalty
            return local_chat_model(self.model, seed=self.seed, **kwargs)
        from langchain_openai import ChatOpenAI

        # Without api_key_env the endpoint needs no key (Ollama, vLLM, llama.cpp...). An
        # explicit placeholder stops ChatOpenAI from silently sending OPENAI_API_KEY to a
        # third-party server.
        api_key = "not-needed"
        if self.api_key_env:
            register_env(self.api_key_env)
            api_key = os.environ.get(self.api_key_env, "").strip()
            if not api_key:
                raise _config_error(
                    f"{self._named(where)} needs an API key: set the environment variable "
                    f"{self.api_key_env}"
                )
        options = {
            k: v
            for k, v in {
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "seed": self.seed,
                "timeout": self.timeout,
                "frequency_penalty": self.frequency_penalty,
            }.items()
            if v is not None
        }
        return ChatOpenAI(
            model=self.model, base_url=self.base_url, api_key=api_key, stream_usage=True,
            **options,
        )  # fmt: skip


def _base_url_problem(url: str) -> str | None:
    """What is wrong with a base URL, without repeating it (it may hold a key)."""
    if not re.match(r"https?://", url):
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]{0,15})://", url)
        got = f", got {scheme.group(1)}://..." if scheme else ""
        return f"must start with http:// or https://{got} (e.g. https://api.together.xyz/v1)"
    if not url.isprintable() or any(c.isspace() for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if "@" in parts.netloc:
        return (
            "must not hold credentials (user:key@host); put the key in an environment "
            "variable and give its name with api_key_env"
        )
    if not parts.hostname:
        return "has no host (e.g. https://api.together.xyz/v1)"
    return None


class LabelSettings(BaseModel):
    """How `moa label` judges with this recipe by default (its flags override each one).

    Calls per prompt: ``samples`` (with --policy) + judge calls, where the judge calls are
    samples x (samples - 1) / 2 pairs (x 2 with ``swap``) per judge in pairwise mode, or
    ``samples`` per judge in pointwise mode, plus the same again for the aggregator when
    ``aggregate`` is on.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, use_attribute_docstrings=True
    )

    mode: Literal["pairwise", "pointwise", "likelihood"] = "pairwise"
    """``likelihood`` (each candidate scored by the judges' token probabilities of writing
    it) needs local judges and ignores ``aggregate``."""
    samples: StrictInt = Field(default=5, ge=MIN_SAMPLES, le=MAX_SAMPLES)
    """Candidates sampled per prompt with --policy."""
    scoring: Literal["verdict", "probability"] = "verdict"
    """Pairwise and pointwise: count the written verdicts, or read the judges' token
    probabilities at the verdict (servers that return logprobs)."""
    swap: StrictBool = True
    """Pairwise: judge each pair in both orders (cancels position bias)."""
    aggregate: StrictBool = True
    """Let the aggregator re-judge with the judges' verdicts in view."""


class Recipe(MoASettings):
    """A named MoA configuration: which models, plus the MoA settings (`MoASettings`).

    The MoA settings (layers, min_proposers, proposer_timeout, layer_quorum...) are
    inherited from `MoASettings`, with its checks; a config file may set any of them, and a
    number must also be in the range `RANGES` documents for files (``layers = 100`` is a
    typo, not a plan). A recipe that exists can run: construction runs the same checks the
    engine does (`MoASettings.check_proposers`).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, use_attribute_docstrings=True
    )

    name: StrictStr
    description: StrictStr = ""
    label: LabelSettings = LabelSettings()
    """Defaults of `moa label` ([label] table in a config file)."""
    proposers: Annotated[list[ModelEntry], Field(max_length=MAX_PROPOSERS)]
    aggregator: ModelEntry
    source: StrictStr | None = None
    """The config file this recipe came from (None for shipped recipes); not compared."""

    @model_validator(mode="after")
    def _can_run(self, info: ValidationInfo) -> Recipe:
        """The file ranges, then the engine's checks (quorum, layers), one line each."""
        for field, (low, high) in _FILE_RANGES.items():
            value = getattr(self, field)
            if value is not None and not low <= value <= high:
                raise _FieldError(field, f"must be {RANGES[field]}, got {_shown(value)}")
        in_file = bool(info.context and info.context.get("config_file"))
        if self.layers > 1 and not self.proposers and in_file:
            raise _FieldError(
                "proposers", "add at least one [[proposers]] entry, or set layers = 1"
            )
        self.check_proposers(len(self.proposers))
        return self

    def _compared(self) -> tuple[Any, ...]:
        return tuple(
            tuple(value) if isinstance(value, list) else value
            for name, value in self.__dict__.items()
            if name != "source"
        )

    def __eq__(self, other: object) -> bool:
        """Same configuration; where it was read from (`source`) does not count."""
        if not isinstance(other, Recipe):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())

    @property
    def entries(self) -> list[ModelEntry]:
        return [*self.proposers, self.aggregator]

    @property
    def is_local(self) -> bool:
        """True when every model is the embedded one (no network, no key)."""
        return all(e.provider == "local" for e in self.entries)

    def with_max_tokens(self, max_tokens: int) -> Recipe:
        """The same recipe with every model's answer capped at `max_tokens` tokens.

        Used by ``moa chat --max-tokens`` to keep a run short (tests, slow CPUs) without
        writing a config file. (`model_copy` does not validate, hence the check here.)
        """
        if (
            not isinstance(max_tokens, int)
            or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= MAX_TOKENS
        ):
            raise _config_error(
                f"max_tokens must be {RANGES['max_tokens']}, got {_shown(max_tokens)}"
            )

        def cap(entry: ModelEntry) -> ModelEntry:
            return entry.model_copy(update={"max_tokens": max_tokens})

        return self.model_copy(
            update={
                "proposers": [cap(e) for e in self.proposers],
                "aggregator": cap(self.aggregator),
            }
        )

    def build_models(self) -> tuple[list[Any], Any]:
        """(proposers, aggregator) chat models; keys are read from the environment now."""
        proposers = [e.build(f"proposer {i + 1}") for i, e in enumerate(self.proposers)]
        return proposers, self.aggregator.build("aggregator")

    def chat_moa_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ChatMoA` / `build_moa_graph` (models built now)."""
        proposers, aggregator = self.build_models()
        settings = {name: getattr(self, name) for name in MoASettings.model_fields}
        return {"proposers": proposers, "aggregator": aggregator, **settings}


# ------------------------------------------------------------------ shipped recipes


def _local(temperature: float, seed: int, max_tokens: int) -> ModelEntry:
    return ModelEntry(provider="local", temperature=temperature, seed=seed, max_tokens=max_tokens)


def _together(model: str, temperature: float = 0.7, max_tokens: int = 1024) -> ModelEntry:
    return ModelEntry(
        model=model, base_url=TOGETHER_BASE_URL, api_key_env=TOGETHER_KEY_ENV,
        temperature=temperature, max_tokens=max_tokens,
    )  # fmt: skip


# Open, non-reasoning chat models from different labs (diversity of sources is what the MoA
# paper and SlimMoA found to matter), all on Together's serverless API at the time of
# writing. Hosted model names change: override with a config file when one is retired.
TOGETHER_PROPOSERS = (
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "deepseek-ai/DeepSeek-V3",
    "Qwen/Qwen3-235B-A22B-Instruct-2507-tput",
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8",
)
# The paper aggregated with its strongest open Qwen (Qwen1.5-110B-Chat); Qwen2.5-72B is the
# served successor of that line, and an aggregator's solo quality predicts its aggregation.
TOGETHER_AGGREGATOR = "Qwen/Qwen2.5-72B-Instruct-Turbo"


def _together_recipe(name: str, layers: int, description: str) -> Recipe:
    """The paper's setup on Together: same models, `layers` deep (3 = MoA, 2 = MoA-Lite)."""
    return Recipe(
        name=name,
        description=description,
        proposers=[_together(m) for m in TOGETHER_PROPOSERS],
        aggregator=_together(TOGETHER_AGGREGATOR, temperature=0.7, max_tokens=2048),
        layers=layers,
        min_proposers=2,
        proposer_timeout=120,
    )


RECIPES: dict[str, Recipe] = {
    "local": Recipe(
        name="local",
        description=(
            "Self-MoA (arXiv 2502.00674: sampling one model several times beats mixing "
            "models) on the bundled SmolLM2-135M-Instruct: 3 samples at temperatures "
            "0.6/0.8/1.0 with different seeds propose, a 0.3-temperature sample aggregates; "
            "2 layers, offline, no API key."
        ),
        # A 135M model rambles and repeats when sampled hot; 0.6-1.0 keeps the drafts
        # different yet on topic. Caps measured on ordinary questions (commit-message tips,
        # a capital, hash tables): drafts end by themselves in 8-311 tokens, answers in
        # 8-370, so 320/512 lets them finish ("stop"; 160/200 cut the tips answer off)
        # while an answer that rambles on is still cut in well under a minute on 2 cores.
        # A frequency_penalty of 0.5 was measured too: it lengthened some drafts by 40-100
        # tokens and stopped no rambling answer, so it is left off.
        proposers=[_local(0.6, 11, 320), _local(0.8, 22, 320), _local(1.0, 33, 320)],
        aggregator=_local(0.3, 7, 512),
        layers=2,
        proposer_timeout=120,
        # Likelihood: on the shipped right/wrong pairs a 135M judge's written verdicts and
        # its probabilities at the verdict are chance (50 %), while the probability it gives
        # each answer picks the right one 88 % of the time (docs/judge.md). 4 samples, each
        # scored once (the 3 judges are one model in 3 seeds): 8 calls per prompt.
        label=LabelSettings(mode="likelihood", samples=4, aggregate=False),
    ),
    "together-moa": _together_recipe(
        "together-moa",
        3,
        "The MoA paper's 3-layer configuration (2 proposer layers + aggregator) on Together's "
        "OpenAI-compatible API, with currently served open models (the paper's Qwen1.5-110B "
        "and others are no longer served); key in TOGETHER_API_KEY.",
    ),
    "together-moa-lite": _together_recipe(
        "together-moa-lite",
        2,
        "MoA-Lite: 2 layers (one proposer layer + aggregator) on Together's API, same models "
        "as together-moa; cheaper and faster; key in TOGETHER_API_KEY.",
    ),
}


def list_recipes() -> list[str]:
    """Names of the shipped recipes, the default (``local``) first."""
    return list(RECIPES)


# ------------------------------------------------------------------- config files

# What a config file may set: `source` is filled in by the loader, never by the file.
_ENTRY_KEYS = tuple(ModelEntry.model_fields)
_CONFIG_KEYS = tuple(name for name in Recipe.model_fields if name != "source")
_LABEL_KEYS = tuple(LabelSettings.model_fields)
_TYPE_NAMES = {
    "int_type": "integer",
    "float_type": "integer or number",  # StrictFloat takes ints too
    "string_type": "string",
    "list_type": "list",
    "model_type": "table",
    "dict_type": "table",
}


_OUT_OF_RANGE = (
    "greater_than_equal", "greater_than", "less_than_equal", "less_than", "finite_number",
)  # fmt: skip


def _unknown(key: str, known: tuple[str, ...]) -> str:
    """Why `key` is refused: a secret's name gets the api_key_env pointer, a typo a hint."""
    if key.lower() in _SECRET_FIELDS:
        return (
            "keys do not belong in config files; put the key in an environment variable "
            "and give its name with api_key_env"
        )
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field ({hint}known: {', '.join(known)})"


def _field_path(loc: tuple[int | str, ...]) -> str:
    """Where an error is, as people count: ``("proposers", 0, "model")`` -> ``proposer 1: model``.

    Entries of ``[[proposers]]`` are numbered from 1, like the CLI's "proposer N" (a
    ``proposers[0]`` would read as a 0-based index to some and a first entry to others);
    other fields keep their dotted names (``aggregator.base_url``, ``label.mode``).
    """
    if len(loc) >= 2 and loc[0] == "proposers" and isinstance(loc[1], int):
        entry = f"proposer {loc[1] + 1}"
        rest = ".".join(str(part) for part in loc[2:])
        return f"{entry}: {rest}" if rest else entry
    return ".".join(str(part) for part in loc)


def _describe(exc: ValidationError, source: str, keys: Sequence[Any] = ()) -> str:
    """The first of pydantic's errors as ``{source}: {field}: {reason}`` on one line.

    Unknown fields go first (a typo usually explains the rest), then the first mistake in
    the file's own order (`keys`: its top-level keys as written), then shallower errors.
    A value is repeated only when it cannot be a key (`_shown`), and never for
    ``api_key_env``; an unknown field's name likewise.
    """
    errors = exc.errors()
    position = {key: i for i, key in enumerate(keys)}
    error = min(
        errors,
        key=lambda e: (
            e["type"] not in ("extra_forbidden", "invalid_key"),
            position.get(e["loc"][0] if e["loc"] else None, len(position)),
            len(e["loc"]),
        ),
    )
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    ctx = error.get("ctx") or {}
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a YAML key like `1:`
        *where, key = loc
        known = _CONFIG_KEYS if not where else _LABEL_KEYS if where[0] == "label" else _ENTRY_KEYS
        reason = _unknown(str(key), known)
        name = str(key)
        if _could_be_secret(name) or not name.isprintable() or len(name) > 40:
            name = "a field whose name is not repeated (it could be a key)"
        loc = (*where, name)
    elif kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, _FieldError):
            loc = (*loc, cause.field)
        reason = str(cause) if cause is not None else error["msg"]
        if loc and isinstance(cause, ConfigError):  # worded in the setting's name
            reason = reason.removeprefix(f"{loc[-1]} ")
    else:
        field = next((p for p in reversed(loc) if isinstance(p, str)), "")
        secret = field == "api_key_env"  # the value might be a pasted key
        scalar = not secret and not isinstance(value, (dict, list, tuple))
        shown = f" {_shown(value)}" if scalar else ""
        if shown.startswith(" a "):  # a description, not the value: "got a string of..."
            got = f"got{shown}"
        else:
            got = f"got {type(value).__name__}{shown}"
        if kind == "model_type" and loc and isinstance(loc[-1], int):
            reason = (
                f"expected a table of model settings (at least 'model'), got {type(value).__name__}"
            )
        elif kind in _TYPE_NAMES:
            reason = f"expected {_TYPE_NAMES[kind]}, {got}"
        elif kind == "missing":
            hint = " ([aggregator] table with 'model')" if loc == ("aggregator",) else ""
            reason = f"missing{hint}"
        elif kind == "literal_error":
            choices = ", ".join(PROVIDERS) if field == "provider" else ctx.get("expected")
            reason = f"must be one of {choices}, got{shown or ' ' + type(value).__name__}"
        elif kind in _OUT_OF_RANGE and field in RANGES:
            reason = f"must be {RANGES[field]}, got {_shown(value)}"
        elif kind == "too_long" and field == "proposers":
            reason = f"at most {MAX_PROPOSERS} entries, got {ctx.get('actual_length')}"
        else:
            reason = error["msg"]
    path = _field_path(loc)
    return f"{source}: {path}: {reason}" if path else f"{source}: {reason}"


def recipe_from_dict(data: Any, *, source: str) -> Recipe:
    """Validate a parsed config file; errors name the file and the field."""
    if data is None:
        raise _config_error(f"{source}: the file is empty; it needs at least an [aggregator] table")
    if not isinstance(data, dict):
        raise _config_error(
            f"{source}: expected a table/mapping at the top level, got {type(data).__name__}"
        )
    if "source" in data:
        raise _config_error(f"{source}: source: {_unknown('source', _CONFIG_KEYS)}")
    values = {
        "name": Path(source).stem,
        "description": f"from {source}",
        "proposers": [],
        **data,
        "source": source,
    }
    try:
        return Recipe.model_validate(values, context={"config_file": True})
    except ValidationError as exc:
        # `from None`: the ValidationError's own text would quote the values.
        raise _config_error(_describe(exc, source, list(data))) from None
    except RecursionError:
        raise _config_error(f"{source}: {_TOO_DEEP}") from None


_TOO_DEEP = "nested too deeply to read (a config file needs only a few levels of tables)"


def _parse_problem(exc: BaseException) -> str:
    """Why a parser refused a file, besides its own syntax errors (one line, no value)."""
    if isinstance(exc, RecursionError):
        return _TOO_DEEP
    if "digits" in str(exc):  # int() refuses more than sys.get_int_max_str_digits()
        return "a number has too many digits to read"
    return f"cannot be read ({type(exc).__name__})"


def load_config_file(path: str | Path) -> Recipe:
    """Load a TOML or YAML config file describing the models (see docs/recipes.md)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _config_error(f"config file {path} does not exist")
    if not path.is_file():
        raise _config_error(f"config file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise _config_error(f"{path}: config files must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _config_error(f"{path}: cannot read the file ({type(exc).__name__})") from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
            raise _config_error(f"{path}: invalid TOML: {_hide_secrets(str(exc))}") from None
        except (ValueError, RecursionError) as exc:
            raise _config_error(f"{path}: invalid TOML: {_parse_problem(exc)}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = _hide_secrets(getattr(exc, "problem", None) or "syntax error")
            raise _config_error(f"{path}: invalid YAML{where}: {problem}") from None
        except (ValueError, OverflowError, RecursionError) as exc:
            raise _config_error(f"{path}: invalid YAML: {_parse_problem(exc)}") from None
    return recipe_from_dict(data, source=str(path))


def is_config_path(name_or_path: str) -> bool:
    """Whether `load_recipe` treats the argument as a file (suffix, or an existing path)."""
    return name_or_path.lower().endswith(CONFIG_SUFFIXES) or Path(name_or_path).exists()


def load_recipe(name_or_path: str = "local") -> Recipe:
    """A shipped recipe by name, or a config file by path (.toml/.yaml/.yml or existing)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise _config_error(
            f"a recipe is a name or a config file path, got {type(name_or_path).__name__}"
        )
    name_or_path = os.fspath(name_or_path)
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    if is_config_path(name_or_path):
        return load_config_file(name_or_path)
    close = difflib.get_close_matches(name_or_path, list(RECIPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    name = _shown(name_or_path)
    name = "" if name.startswith("a ") else f" {name}"
    raise _config_error(
        f"unknown recipe{name}{hint}: choose one of {', '.join(RECIPES)} "
        f"or pass a .toml/.yaml config file"
    )


__all__ = [
    "PROVIDERS",
    "RECIPES",
    "TOGETHER_AGGREGATOR",
    "TOGETHER_BASE_URL",
    "TOGETHER_PROPOSERS",
    "ModelEntry",
    "Recipe",
    "list_recipes",
    "load_config_file",
    "load_recipe",
    "recipe_from_dict",
]

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
Every mistake in one is a one-line `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_moa.engine import validate_moa_config
from langchain_moa.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOGETHER_BASE_URL = "https://api.together.xyz/v1"
TOGETHER_KEY_ENV = "TOGETHER_API_KEY"
PROVIDERS = ("openai-compatible", "local")
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")

_NUMBER = (int, float)
_ENTRY_FIELDS: dict[str, Any] = {
    "model": str,
    "base_url": str,
    "api_key_env": str,
    "temperature": _NUMBER,
    "max_tokens": int,
    "seed": int,
    "provider": str,
    "timeout": _NUMBER,
}
_TOP_FIELDS: dict[str, Any] = {
    "name": str,
    "description": str,
    "layers": int,
    "min_proposers": int,
    "proposer_timeout": _NUMBER,
    "aggregator_prompt": str,
    "proposers": list,
    "aggregator": dict,
}
# Fields people reach for that would put a secret in a file: refuse them with a pointer.
_SECRET_FIELDS = {"api_key", "key", "token", "openai_api_key", "password", "secret"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ModelEntry:
    """How to reach one model: an OpenAI-compatible endpoint, or the embedded local server.

    Holds the *name* of the environment variable with the key, never the key, so a recipe
    can be printed, logged or put in an error message safely.
    """

    model: str | None = None
    """Model name at the endpoint; for provider "local", a GGUF path / HF file / None (SmolLM2)."""
    base_url: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the key (never the key itself)."""
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    provider: str = "openai-compatible"
    timeout: float | None = None
    """Seconds for one HTTP request (the client's own timeout)."""

    @property
    def label(self) -> str:
        """A short name for messages: the model, or the embedded model's alias."""
        if self.model:
            return self.model
        return "local SmolLM2" if self.provider == "local" else "model"

    def build(self, where: str = "model") -> Any:
        """A chat model for this entry; the key is read from the environment now.

        Raises a one-line `ConfigError` naming `where`, the model and the variable when a
        needed key is not set (the value is never shown).
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
            return local_chat_model(self.model, seed=self.seed, **kwargs)
        from langchain_openai import ChatOpenAI

        # Without api_key_env the endpoint needs no key (Ollama, vLLM, llama.cpp...). An
        # explicit placeholder stops ChatOpenAI from silently sending OPENAI_API_KEY to a
        # third-party server.
        api_key = "not-needed"
        if self.api_key_env:
            api_key = os.environ.get(self.api_key_env, "").strip()
            if not api_key:
                raise ConfigError(
                    f"{where} ({self.label}) needs an API key: set the environment variable "
                    f"{self.api_key_env}"
                )
        options = {
            k: v
            for k, v in {
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
                "seed": self.seed,
                "timeout": self.timeout,
            }.items()
            if v is not None
        }
        return ChatOpenAI(
            model=self.model, base_url=self.base_url, api_key=api_key, stream_usage=True,
            **options,
        )  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A named MoA configuration: which models, how many layers, the quorum and timeout."""

    name: str
    proposers: list[ModelEntry]
    aggregator: ModelEntry
    layers: int = 2
    min_proposers: int = 1
    proposer_timeout: float | None = None
    aggregator_prompt: str | None = None
    description: str = ""
    source: str | None = field(default=None, compare=False)
    """The config file this recipe came from (None for shipped recipes)."""

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
        writing a config file.
        """
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")

        def cap(entry: ModelEntry) -> ModelEntry:
            return dataclasses.replace(entry, max_tokens=max_tokens)

        return dataclasses.replace(
            self, proposers=[cap(e) for e in self.proposers], aggregator=cap(self.aggregator)
        )

    def build_models(self) -> tuple[list[Any], Any]:
        """(proposers, aggregator) chat models; keys are read from the environment now."""
        proposers = [e.build(f"proposers[{i}]") for i, e in enumerate(self.proposers)]
        return proposers, self.aggregator.build("aggregator")

    def chat_moa_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ChatMoA` / `build_moa_graph` (models built now)."""
        proposers, aggregator = self.build_models()
        kwargs: dict[str, Any] = {
            "proposers": proposers,
            "aggregator": aggregator,
            "layers": self.layers,
            "min_proposers": self.min_proposers,
            "proposer_timeout": self.proposer_timeout,
        }
        if self.aggregator_prompt is not None:
            kwargs["aggregator_prompt"] = self.aggregator_prompt
        return kwargs


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
        # different yet on topic. Short caps keep an answer to seconds on 2 CPU cores.
        proposers=[_local(0.6, 11, 160), _local(0.8, 22, 160), _local(1.0, 33, 160)],
        aggregator=_local(0.3, 7, 200),
        layers=2,
        proposer_timeout=120,
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


def _type_names(expected: Any) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_type(value: Any, expected: Any, where: str, *, show: bool = True) -> None:
    # bool is an int subclass: `layers = true` must not pass as 1
    if isinstance(value, bool) or not isinstance(value, expected):
        shown = f" {value!r}" if show and not isinstance(value, (dict, list)) else ""
        raise ConfigError(
            f"{where}: expected {_type_names(expected)}, got {type(value).__name__}{shown}"
        )


def _unknown(key: str, where: str, known: Any, sep: str = ".") -> ConfigError:
    if key.lower() in _SECRET_FIELDS:
        return ConfigError(
            f"{where}{sep}{key}: keys do not belong in config files; put the key in an environment "
            f"variable and give its name with api_key_env"
        )
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{where}{sep}{key}: unknown field ({hint}known: {', '.join(known)})")


def _entry(data: Any, where: str) -> ModelEntry:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a table of model settings (at least 'model'), "
            f"got {type(data).__name__}"
        )
    for key, value in data.items():
        if key not in _ENTRY_FIELDS:
            raise _unknown(str(key), where, _ENTRY_FIELDS)
        # the api_key_env value might be a pasted key: never echo it
        _check_type(value, _ENTRY_FIELDS[key], f"{where}.{key}", show=key != "api_key_env")
    provider = data.get("provider", "openai-compatible")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"{where}.provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}"
        )
    env = data.get("api_key_env")
    if env is not None and (not _ENV_NAME.fullmatch(env) or len(env) > 64):
        raise ConfigError(
            f"{where}.api_key_env: must be the NAME of an environment variable "
            f"(e.g. TOGETHER_API_KEY), not the key itself"
        )
    if provider != "local":
        if not data.get("model"):
            raise ConfigError(f"{where}.model: missing (the model name at the endpoint)")
        if not data.get("base_url"):
            raise ConfigError(
                f"{where}.base_url: missing (e.g. https://api.together.xyz/v1), "
                f'or set provider = "local" for the embedded model'
            )
        if not re.match(r"https?://", data["base_url"]):
            raise ConfigError(
                f"{where}.base_url: must start with http:// or https://, got {data['base_url']!r}"
            )
    if "max_tokens" in data and data["max_tokens"] < 1:
        raise ConfigError(f"{where}.max_tokens: must be >= 1, got {data['max_tokens']}")
    if "temperature" in data and data["temperature"] < 0:
        raise ConfigError(f"{where}.temperature: must be >= 0, got {data['temperature']}")
    if "timeout" in data and data["timeout"] <= 0:
        raise ConfigError(f"{where}.timeout: must be > 0 seconds, got {data['timeout']}")
    return ModelEntry(**data)


def recipe_from_dict(data: Any, *, source: str) -> Recipe:
    """Validate a parsed config file; errors name the file and the field."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; it needs at least an [aggregator] table")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a table/mapping at the top level, got {type(data).__name__}"
        )
    for key, value in data.items():
        if key not in _TOP_FIELDS:
            raise _unknown(str(key), source, _TOP_FIELDS, sep=": ")
        _check_type(value, _TOP_FIELDS[key], f"{source}: {key}")
    if "aggregator" not in data:
        raise ConfigError(f"{source}: aggregator: missing ([aggregator] table with 'model')")
    proposers = [
        _entry(item, f"{source}: proposers[{i}]")
        for i, item in enumerate(data.get("proposers", []))
    ]
    aggregator = _entry(data["aggregator"], f"{source}: aggregator")
    layers = data.get("layers", 2)
    if layers > 1 and not proposers:
        raise ConfigError(
            f"{source}: proposers: add at least one [[proposers]] entry, or set layers = 1"
        )
    min_proposers = data.get("min_proposers", 1)
    proposer_timeout = data.get("proposer_timeout")
    try:
        validate_moa_config(
            n_proposers=len(proposers),
            layers=layers,
            min_proposers=min_proposers,
            proposer_timeout=proposer_timeout,
        )
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return Recipe(
        name=data.get("name", Path(source).stem),
        description=data.get("description", f"from {source}"),
        proposers=proposers,
        aggregator=aggregator,
        layers=layers,
        min_proposers=min_proposers,
        proposer_timeout=proposer_timeout,
        aggregator_prompt=data.get("aggregator_prompt"),
        source=source,
    )


def load_config_file(path: str | Path) -> Recipe:
    """Load a TOML or YAML config file describing the models (see docs/recipes.md)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the file ({type(exc).__name__})") from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return recipe_from_dict(data, source=str(path))


def is_config_path(name_or_path: str) -> bool:
    """Whether `load_recipe` treats the argument as a file (suffix, or an existing path)."""
    return name_or_path.lower().endswith(CONFIG_SUFFIXES) or Path(name_or_path).exists()


def load_recipe(name_or_path: str = "local") -> Recipe:
    """A shipped recipe by name, or a config file by path (.toml/.yaml/.yml or existing)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(
            f"a recipe is a name or a config file path, got {type(name_or_path).__name__}"
        )
    name_or_path = os.fspath(name_or_path)
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    if is_config_path(name_or_path):
        return load_config_file(name_or_path)
    close = difflib.get_close_matches(name_or_path, list(RECIPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown recipe {name_or_path!r}{hint}: choose one of {', '.join(RECIPES)} "
        f"or pass a .toml/.yaml config file"
    )


__all__ = [
    "RECIPES",
    "TOGETHER_BASE_URL",
    "ModelEntry",
    "Recipe",
    "list_recipes",
    "load_config_file",
    "load_recipe",
    "recipe_from_dict",
]

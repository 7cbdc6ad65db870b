"""Recipes: named, documented MoA configurations, and user config files.

A recipe says which models propose, which aggregates, how many layers, and how each model
is reached (any OpenAI-compatible endpoint, or the embedded local model). Models are built
only when asked for (`Recipe.build_models`), and API keys are read from the environment at
that moment, so loading a recipe never needs a key and a key is never stored in a recipe.

Shipped recipes:

- ``local`` (default): Self-MoA on the bundled SmolLM2-135M-Instruct. Self-MoA (arXiv
  2502.00674) found that sampling one model several times and aggregating beats mixing
  different models; here three samples at different temperatures and seeds propose and a
  low-temperature sample aggregates. Runs offline on a laptop CPU.
- ``together-moa``: the paper's 3-layer shape (two proposer layers, then the aggregator) on
  Together's OpenAI-compatible API (key in ``TOGETHER_API_KEY``), with currently served
  open models in place of the paper's (Qwen1.5-110B and others are no longer served).
- ``together-moa-lite``: the 2-layer MoA-Lite shape on the same models.

Config files (TOML or YAML) describe any OpenAI-compatible endpoints; see README.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_moa.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOGETHER_BASE_URL = "https://api.together.xyz/v1"

_ENTRY_FIELDS = {
    "model": str,
    "base_url": str,
    "api_key_env": str,
    "temperature": (int, float),
    "max_tokens": int,
    "seed": int,
    "provider": str,
    "timeout": (int, float),
}
_TOP_FIELDS = {
    "name": str,
    "description": str,
    "layers": int,
    "min_proposers": int,
    "proposer_timeout": (int, float),
    "aggregator_prompt": str,
    "proposers": list,
    "aggregator": dict,
}
PROVIDERS = ("openai-compatible", "local")


@dataclass(frozen=True)
class ModelEntry:
    """How to reach one model."""

    model: str | None = None
    """Model name at the endpoint; for provider "local", a GGUF path / HF file / None."""
    base_url: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the key (never the key itself)."""
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    provider: str = "openai-compatible"
    timeout: float | None = None

    def build(self, where: str = "model") -> Any:
        """A chat model for this entry (the key is read from the environment now)."""
        if self.provider == "local":
            from langchain_moa.local import local_chat_model

            kwargs: dict[str, Any] = {}
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            if self.max_tokens is not None:
                kwargs["max_tokens"] = self.max_tokens
            return local_chat_model(self.model, seed=self.seed, **kwargs)
        from langchain_openai import ChatOpenAI

        api_key = "not-needed"
        if self.api_key_env:
            api_key = os.environ.get(self.api_key_env, "")
            if not api_key:
                raise ConfigError(
                    f"{where} ({self.model}) needs an API key: set the environment variable "
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
    """A named MoA configuration."""

    name: str
    proposers: list[ModelEntry]
    aggregator: ModelEntry
    layers: int = 2
    min_proposers: int = 1
    proposer_timeout: float | None = None
    aggregator_prompt: str | None = None
    description: str = ""

    def build_models(self) -> tuple[list[Any], Any]:
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


def _local(temperature: float, seed: int, max_tokens: int) -> ModelEntry:
    return ModelEntry(provider="local", temperature=temperature, seed=seed, max_tokens=max_tokens)


def _together(model: str, temperature: float = 0.7, max_tokens: int = 1024) -> ModelEntry:
    return ModelEntry(
        model=model, base_url=TOGETHER_BASE_URL, api_key_env="TOGETHER_API_KEY",
        temperature=temperature, max_tokens=max_tokens,
    )  # fmt: skip


_TOGETHER_PROPOSERS = [
    "Qwen/Qwen2.5-72B-Instruct-Turbo",
    "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "deepseek-ai/DeepSeek-V3",
    "moonshotai/Kimi-K2-Instruct-0905",
    "openai/gpt-oss-120b",
]
_TOGETHER_AGGREGATOR = "Qwen/Qwen2.5-72B-Instruct-Turbo"


def _together_recipe(name: str, layers: int, description: str) -> Recipe:
    """The paper's setup on Together: same models, `layers` deep (3 = MoA, 2 = MoA-Lite)."""
    return Recipe(
        name=name,
        description=description,
        proposers=[_together(m) for m in _TOGETHER_PROPOSERS],
        aggregator=_together(_TOGETHER_AGGREGATOR, temperature=0.7, max_tokens=2048),
        layers=layers,
        min_proposers=2,
        proposer_timeout=120,
    )


RECIPES: dict[str, Recipe] = {
    "local": Recipe(
        name="local",
        description=(
            "Self-MoA on the bundled SmolLM2-135M-Instruct (arXiv 2502.00674): 3 samples of "
            "one model at different temperatures/seeds propose, a low-temperature sample "
            "aggregates; offline, no API key."
        ),
        proposers=[_local(0.6, 11, 160), _local(0.8, 22, 160), _local(1.0, 33, 160)],
        aggregator=_local(0.3, 7, 200),
        layers=2,
        proposer_timeout=120,
    ),
    "together-moa": _together_recipe(
        "together-moa",
        3,
        "The MoA paper's 3-layer shape (2 proposer layers + aggregator) on Together's "
        "OpenAI-compatible API with currently served open models; key in TOGETHER_API_KEY.",
    ),
    "together-moa-lite": _together_recipe(
        "together-moa-lite",
        2,
        "MoA-Lite: 2 layers (one proposer layer + aggregator) on Together's API; key in "
        "TOGETHER_API_KEY.",
    ),
}


def list_recipes() -> list[str]:
    return list(RECIPES)


def _check_type(value: Any, expected: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, expected):
        names = (
            " or ".join(t.__name__ for t in expected)
            if isinstance(expected, tuple)
            else expected.__name__
        )
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")


def _entry(data: Any, where: str) -> ModelEntry:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table with at least 'model', got {data!r}")
    for key, value in data.items():
        if key not in _ENTRY_FIELDS:
            known = ", ".join(_ENTRY_FIELDS)
            raise ConfigError(f"{where}.{key}: unknown field (known: {known})")
        _check_type(value, _ENTRY_FIELDS[key], f"{where}.{key}")
    provider = data.get("provider", "openai-compatible")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}.provider: must be one of {', '.join(PROVIDERS)}")
    if provider != "local":
        if not data.get("model"):
            raise ConfigError(f"{where}.model: missing (the model name at the endpoint)")
        if not data.get("base_url"):
            raise ConfigError(f"{where}.base_url: missing (e.g. https://api.example.com/v1)")
    return ModelEntry(**data)


def recipe_from_dict(data: Any, *, source: str) -> Recipe:
    """Validate a parsed config file; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table/mapping at the top level")
    for key, value in data.items():
        if key not in _TOP_FIELDS:
            raise ConfigError(f"{source}: {key}: unknown field (known: {', '.join(_TOP_FIELDS)})")
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
        raise ConfigError(f"{source}: proposers: at least one [[proposers]] entry when layers > 1")
    return Recipe(
        name=data.get("name", Path(source).stem),
        description=data.get("description", f"from {source}"),
        proposers=proposers,
        aggregator=aggregator,
        layers=layers,
        min_proposers=data.get("min_proposers", 1),
        proposer_timeout=data.get("proposer_timeout"),
        aggregator_prompt=data.get("aggregator_prompt"),
    )


def load_config_file(path: str | Path) -> Recipe:
    """Load a TOML or YAML config file describing OpenAI-compatible models."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    else:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    return recipe_from_dict(data, source=str(path))


def load_recipe(name_or_path: str = "local") -> Recipe:
    """A shipped recipe by name, or a config file by path."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    if name_or_path.lower().endswith((".toml", ".yaml", ".yml")) or Path(name_or_path).exists():
        return load_config_file(name_or_path)
    raise ConfigError(
        f"unknown recipe {name_or_path!r}: choose one of {', '.join(RECIPES)} "
        f"or pass a .toml/.yaml config file"
    )


__all__ = [
    "RECIPES",
    "ModelEntry",
    "Recipe",
    "list_recipes",
    "load_config_file",
    "load_recipe",
    "recipe_from_dict",
]

"""Recipes and config files: loading, building, and one-line errors naming the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from langchain_openai import ChatOpenAI

from langchain_moa import ChatMoA, ConfigError
from langchain_moa.recipes import RECIPES, TOGETHER_BASE_URL, list_recipes, load_recipe

TOML = """
name = "my-endpoints"
layers = 3
min_proposers = 2
proposer_timeout = 30
aggregator_prompt = "Combine these:"

[[proposers]]
model = "model-a"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_KEY"
temperature = 0.5
max_tokens = 100

[[proposers]]
model = "model-b"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_KEY"

[aggregator]
model = "model-c"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_KEY"
max_tokens = 300
"""

YAML = """
layers: 2
proposers:
  - {model: model-a, base_url: "http://127.0.0.1:9/v1", api_key_env: MY_KEY}
aggregator: {model: model-c, base_url: "http://127.0.0.1:9/v1", api_key_env: MY_KEY}
"""


def test_every_shipped_recipe_loads() -> None:
    assert set(list_recipes()) == {"local", "together-moa", "together-moa-lite"}
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description
    assert RECIPES["together-moa"].layers == 3
    assert RECIPES["together-moa-lite"].layers == 2
    local = RECIPES["local"]
    assert len(local.proposers) == 3 and all(p.provider == "local" for p in local.proposers)
    assert len({(p.temperature, p.seed) for p in local.proposers}) == 3  # Self-MoA samples


def test_together_recipe_builds_openai_compatible_clients(monkeypatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-secret-key-0123456789")
    moa = ChatMoA.from_recipe("together-moa")
    assert moa.layers == 3
    for model in [*moa.proposers, moa.aggregator]:
        assert isinstance(model, ChatOpenAI)
        assert model.openai_api_base == TOGETHER_BASE_URL
    assert "tg-secret-key-0123456789" not in repr(moa)


def test_missing_key_is_one_line_naming_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        ChatMoA.from_recipe("together-moa-lite")
    message = str(info.value)
    assert "TOGETHER_API_KEY" in message and "\n" not in message


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML)])
def test_config_files(tmp_path: Path, monkeypatch, suffix: str, text: str) -> None:
    monkeypatch.setenv("MY_KEY", "sk-my-key-abcdefgh")
    path = tmp_path / f"moa{suffix}"
    path.write_text(text)
    moa = ChatMoA.from_recipe(str(path))
    assert [m.model_name for m in moa.proposers][:1] == ["model-a"]
    assert moa.aggregator.model_name == "model-c"
    if suffix == ".toml":
        assert moa.layers == 3 and moa.min_proposers == 2 and moa.proposer_timeout == 30
        assert moa.aggregator_prompt == "Combine these:"
        assert moa.proposers[0].temperature == 0.5 and moa.proposers[0].max_tokens == 100


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "layers = 'two'\n[aggregator]\nmodel='m'\nbase_url='http://127.0.0.1:9'",
            "layers: expected int",
        ),
        (
            "colour = 1\n[aggregator]\nmodel='m'\nbase_url='http://127.0.0.1:9'",
            "colour: unknown field",
        ),
        ("[aggregator]\nbase_url='http://127.0.0.1:9'", "aggregator.model: missing"),
        ("[aggregator]\nmodel='m'", "aggregator.base_url: missing"),
        (
            "[[proposers]]\nmodel='a'\nbase_url='x'\ntemprature=1\n[aggregator]\nmodel='m'\nbase_url='x'",
            "proposers[0].temprature: unknown field",
        ),
        ("layers = 2\n", "aggregator: missing"),
        ("layers = = 2", "invalid TOML"),
    ],
)
def test_bad_config_files_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_recipe(str(path))
    assert "\n" not in str(info.value)


def test_bad_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("layers: 2\naggregator: {model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_recipe(str(path))


def test_unknown_recipe_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of local, together-moa, together-moa-lite"):
        load_recipe("gpt-99")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("/nonexistent/moa.toml")

"""Recipes and config files: loading, building, and one-line errors naming the field."""

from __future__ import annotations

import re
import secrets
import uuid
from pathlib import Path

import pytest
import yaml
from langchain_openai import ChatOpenAI

from langchain_moa import ChatMoA, ConfigError
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT
from langchain_moa.recipes import (
    RECIPES,
    TOGETHER_BASE_URL,
    ModelEntry,
    Recipe,
    list_recipes,
    load_recipe,
)
from langchain_moa.redaction import redact

SECRET = "tg-secret-key-0123456789abcdef"

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
seed = 4

[[proposers]]
model = "model-b"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_KEY"
timeout = 12.5

[aggregator]
model = "model-c"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_KEY"
max_tokens = 300
"""

AGG = "[aggregator]\nmodel='m'\nbase_url='http://127.0.0.1:9'\n"


def write(tmp_path: Path, text: str, name: str = "moa.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ shipped recipes


def test_every_shipped_recipe_loads() -> None:
    assert list_recipes() == ["local", "together-moa", "together-moa-lite"]
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description
        assert recipe.min_proposers <= len(recipe.proposers)
    assert RECIPES["together-moa"].layers == 3
    assert RECIPES["together-moa-lite"].layers == 2
    assert "no longer served" in RECIPES["together-moa"].description


def test_local_recipe_is_a_self_moa() -> None:
    local = load_recipe()  # the default
    assert local.name == "local" and "2502.00674" in local.description
    assert local.is_local and local.layers == 2
    assert len(local.proposers) == 3
    assert len({(p.temperature, p.seed) for p in local.proposers}) == 3  # distinct samples
    assert local.aggregator.temperature < min(p.temperature for p in local.proposers)
    assert all(e.max_tokens <= 512 for e in local.entries)  # well under a minute on 2 cores


def test_together_recipe_builds_openai_compatible_clients(monkeypatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", SECRET)
    moa = ChatMoA.from_recipe("together-moa")
    assert moa.layers == 3 and moa.min_proposers == 2
    assert len(moa.proposers) == len(RECIPES["together-moa"].proposers)
    models = [*moa.proposers, moa.aggregator]
    for model in models:
        assert isinstance(model, ChatOpenAI)
        assert model.openai_api_base == TOGETHER_BASE_URL
        assert model.openai_api_key.get_secret_value() == SECRET
        assert model.stream_usage is True
    assert moa.aggregator.model_name.startswith("Qwen/")
    # the key shows up in no representation of the model or the recipe
    for text in (repr(moa), str(moa), repr(models), repr(RECIPES["together-moa"])):
        assert SECRET not in text
    assert SECRET not in moa.model_dump_json()


def test_chat_moa_kwargs_shape(monkeypatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", SECRET)
    kwargs = load_recipe("together-moa-lite").chat_moa_kwargs()
    assert set(kwargs) == {
        "proposers", "aggregator", "layers", "min_proposers", "proposer_timeout",
        "layer_quorum", "straggler_grace", "early_stop", "reference_placement",
        "aggregator_prompt",
    }  # fmt: skip
    assert kwargs["layers"] == 2 and kwargs["proposer_timeout"] == 120
    assert kwargs["layer_quorum"] is None  # shipped recipes keep the reference structure


def test_config_files_set_the_latency_options(tmp_path) -> None:
    path = tmp_path / "fast.toml"
    entry = 'model = "{}"\nbase_url = "http://127.0.0.1:9/v1"\n'
    path.write_text(
        'layers = 3\nlayer_quorum = 2\nstraggler_grace = 0.25\nearly_stop = "agreement"\n'
        'reference_placement = "after_conversation"\n'
        + "".join("[[proposers]]\n" + entry.format(m) for m in ("a", "b", "c"))
        + "[aggregator]\n"
        + entry.format("agg")
    )
    moa = ChatMoA.from_recipe(str(path))
    assert (moa.layer_quorum, moa.straggler_grace, moa.early_stop) == (2, 0.25, "agreement")
    assert moa.reference_placement == "after_conversation"
    path.write_text(path.read_text().replace("layer_quorum = 2", "layer_quorum = 5"))
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert (
        "layer_quorum must be an integer from min_proposers (1) to the number of proposers (3)"
        in str(info.value)
    )
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["together-moa", "together-moa-lite"])
def test_missing_key_is_one_line_naming_the_variable_and_model(monkeypatch, name) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        ChatMoA.from_recipe(name)
    message = str(info.value)
    assert "TOGETHER_API_KEY" in message and "\n" not in message
    assert "proposer 1 (Qwen/" in message


def test_blank_key_counts_as_missing(monkeypatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", "   ")
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        load_recipe("together-moa").build_models()


def test_loading_never_needs_a_key(monkeypatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    recipe = load_recipe("together-moa")  # only building reads the environment
    assert recipe.proposers[0].api_key_env == "TOGETHER_API_KEY"


def test_with_max_tokens_caps_every_model() -> None:
    capped = load_recipe("local").with_max_tokens(16)
    assert all(e.max_tokens == 16 for e in capped.entries)
    assert RECIPES["local"].proposers[0].max_tokens == 320  # the shipped recipe is untouched
    with pytest.raises(ConfigError, match="max_tokens"):
        load_recipe("local").with_max_tokens(0)


def test_endpoint_without_key_env_sends_no_openai_key(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leave-0123456789")
    model = ModelEntry(model="llama3", base_url="http://127.0.0.1:11434/v1").build()
    assert model.openai_api_key.get_secret_value() == "not-needed"


# ------------------------------------------------------------------- config files


def test_toml_config_round_trip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-my-key-abcdefgh")
    recipe = load_recipe(write(tmp_path, TOML))
    assert recipe.name == "my-endpoints" and recipe.source.endswith("moa.toml")
    moa = ChatMoA.from_recipe(write(tmp_path, TOML))
    assert [m.model_name for m in moa.proposers] == ["model-a", "model-b"]
    assert moa.aggregator.model_name == "model-c" and moa.aggregator.max_tokens == 300
    assert moa.layers == 3 and moa.min_proposers == 2 and moa.proposer_timeout == 30
    assert moa.aggregator_prompt == "Combine these:"
    first, second = moa.proposers
    assert first.temperature == 0.5 and first.max_tokens == 100 and first.seed == 4
    assert second.request_timeout == 12.5
    assert all(m.openai_api_base == "http://127.0.0.1:9/v1" for m in moa.proposers)


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_matches_the_same_toml(tmp_path: Path, monkeypatch, suffix: str) -> None:
    """The same keys in YAML describe the same recipe."""
    import tomllib

    monkeypatch.setenv("MY_KEY", "sk-my-key-abcdefgh")
    data = tomllib.loads(TOML)
    from_yaml = load_recipe(write(tmp_path, yaml.safe_dump(data), f"moa{suffix}"))
    from_toml = load_recipe(write(tmp_path, TOML))
    # equal but for where they came from (`source` is not compared; the default
    # description names the file)
    assert from_yaml.model_copy(update={"description": ""}) == from_toml.model_copy(
        update={"description": ""}
    )
    assert from_yaml.source != from_toml.source


def test_defaults_and_local_provider(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "[[proposers]]\nprovider='local'\n" + AGG, "mine.toml"))
    assert recipe.name == "mine" and recipe.layers == 2 and recipe.min_proposers == 1
    assert recipe.proposer_timeout is None
    assert recipe.aggregator_prompt == DEFAULT_AGGREGATOR_PROMPT
    assert recipe.proposers[0].provider == "local" and recipe.proposers[0].model is None
    assert not recipe.is_local  # the aggregator is an endpoint


def test_single_layer_needs_no_proposers(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "layers = 1\n" + AGG))
    assert recipe.layers == 1 and recipe.proposers == []


def test_an_existing_path_without_suffix_loads_as_config(tmp_path: Path) -> None:
    # the suffix decides the parser, so a suffix-less existing path is a clear error
    path = write(tmp_path, AGG, "moa-config")
    with pytest.raises(ConfigError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_recipe(path)


P = "[[proposers]]\nmodel='a'\nbase_url='http://x'\n"
SECONDS = "a number of seconds from 0.1 to 86400"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layers = 'two'\n" + AGG, "layers: expected integer, got str 'two'"),
        ("layers = true\n" + AGG, "layers: expected integer, got bool"),
        ("proposer_timeout = 'soon'\n" + AGG, "proposer_timeout: expected integer or number"),
        ("colour = 1\n" + AGG, "colour: unknown field"),
        ("layer = 2\n" + AGG, "layer: unknown field (did you mean 'layers'?"),
        ("[aggregator]\nbase_url='http://127.0.0.1:9'", "aggregator.model: missing"),
        ("[aggregator]\nmodel='m'", "aggregator.base_url: missing"),
        ("[aggregator]\nmodel='m'\nbase_url='127.0.0.1:9'", "aggregator.base_url: must start"),
        (P + "temprature=1\n" + AGG, "proposer 1: temprature: unknown field (did you mean"),
        (P + "max_tokens='lots'\n" + AGG, "proposer 1: max_tokens: expected integer"),
        (
            P + "max_tokens=0\n" + AGG,
            "proposer 1: max_tokens: must be an integer from 1 to 1000000, got 0",
        ),
        (
            P + "temperature=-1\n" + AGG,
            "proposer 1: temperature: must be a number from 0 to 2, got -1",
        ),
        (P + "provider='ollama'\n" + AGG, "proposer 1: provider: must be one of"),
        ("proposers = 'a'\n" + AGG, "proposers: expected list"),
        ("proposers = [1]\n" + AGG, "proposer 1: expected a table"),
        (P + P + "temprature=1\n" + AGG, "proposer 2: temprature: unknown field"),
        (
            P + "frequency_penalty=3\n" + AGG,
            "proposer 1: frequency_penalty: must be a number from -2 to 2, got 3",
        ),
        ("aggregator = 'm'\n", "aggregator: expected table"),
        ("layers = 2\n", "aggregator: missing"),
        ("layers = 3\n" + AGG, "proposers: add at least one [[proposers]] entry"),
        ("layers = 0\n" + P + AGG, "layers: must be an integer from 1 to 10, got 0"),
        ("min_proposers = 2\n" + P + AGG, "min_proposers=2 is more than the 1 proposers"),
        (
            "proposer_timeout = 0\n" + P + AGG,
            f"proposer_timeout: must be {SECONDS}, or inf for no limit, got 0",
        ),
        ("layers = = 2", "invalid TOML: Invalid value (at line 1, column"),
        ("[aggregator]\nmodel='m'\n[aggregator]\n", "invalid TOML: Cannot declare"),
    ],
)
def test_bad_config_files_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(path)


def test_keys_in_config_files_are_refused_without_echo(tmp_path: Path) -> None:
    path = write(tmp_path, f"[aggregator]\nmodel='m'\nbase_url='http://x'\napi_key='{SECRET}'\n")
    with pytest.raises(ConfigError, match="api_key: keys do not belong in config files") as info:
        load_recipe(path)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("value", [f"'{SECRET}'", "'sk-proj-abc123def456'", "'Bearer xyz'"])
def test_a_key_pasted_into_api_key_env_is_never_echoed(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[aggregator]\nmodel='m'\nbase_url='http://x'\napi_key_env={value}\n")
    with pytest.raises(ConfigError, match="must be the NAME of an environment variable") as info:
        load_recipe(path)
    assert value.strip("'") not in str(info.value)


def test_bad_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "layers: 2\naggregator: {model: [unclosed\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+, column \d+"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "the file is empty"), ("- 1\n- 2\n", "expected a table/mapping at the top level")],
)
def test_yaml_top_level_must_be_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, text, "c.yaml"))


def test_unknown_recipe_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of local, together-moa, together-moa-lite"):
        load_recipe("gpt-99")
    with pytest.raises(ConfigError, match="did you mean 'together-moa'"):
        load_recipe("together-mao")


def test_missing_or_unreadable_config_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file /nonexistent/moa.toml does not exist"):
        load_recipe("/nonexistent/moa.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        load_recipe(str(tmp_path / "dir.toml"))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_recipe(str(tmp_path / "bin.toml"))


def test_local_entry_needs_no_url_or_key(tmp_path: Path) -> None:
    text = "layers = 1\n[aggregator]\nprovider='local'\nmodel='x.gguf'\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.aggregator.base_url is None and recipe.aggregator.label == "x.gguf"
    assert recipe.is_local


# ------------------------------------------------------------- pydantic models


def test_recipes_are_frozen_pydantic_models_refusing_unknown_fields() -> None:
    from pydantic import BaseModel, ValidationError

    recipe = RECIPES["local"]
    assert isinstance(recipe, BaseModel) and isinstance(recipe.aggregator, BaseModel)
    with pytest.raises(ValidationError):
        recipe.layers = 5  # frozen
    with pytest.raises(ValidationError):
        ModelEntry(model="m", base_url="http://x", colour="red")  # extra="forbid"
    assert Recipe.model_validate(recipe.model_dump()) == recipe  # a dump loads back
    assert hash(recipe) == hash(recipe.model_copy())


def test_source_is_not_compared(tmp_path: Path) -> None:
    text = "layers = 1\n" + AGG
    first = load_recipe(write(tmp_path, text, "a.toml")).model_copy(update={"name": "x"})
    second = load_recipe(write(tmp_path, text, "b.toml")).model_copy(update={"name": "x"})
    assert first.source != second.source
    assert first.model_copy(update={"description": ""}) == second.model_copy(
        update={"description": ""}
    )
    assert first != first.model_copy(update={"layers": 2})


def test_inf_proposer_timeout_means_no_limit(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "proposer_timeout = inf\n" + P + AGG))
    assert recipe.proposer_timeout is None
    assert load_recipe(write(tmp_path, "proposer_timeout = 30\n" + P + AGG)).proposer_timeout == 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "proposer_timeout = nan\n" + P + AGG,
            f"proposer_timeout: must be {SECONDS}, or inf for no limit, got nan",
        ),
        (
            "proposer_timeout = -5\n" + P + AGG,
            f"proposer_timeout: must be {SECONDS}, or inf for no limit, got -5",
        ),
        ("min_proposers = true\n" + P + AGG, "min_proposers: expected integer, got bool"),
        ("layers = 2.0\n" + P + AGG, "layers: expected integer, got float 2.0"),
        (P + "seed=true\n" + AGG, "proposer 1: seed: expected integer, got bool"),
        (P + "max_tokens='5'\n" + AGG, "proposer 1: max_tokens: expected integer, got str '5'"),
        (P + "temperature='0.5'\n" + AGG, "proposer 1: temperature: expected integer or num"),
        (P + "timeout=0\n" + AGG, f"proposer 1: timeout: must be {SECONDS}, got 0"),
        (P + "token='abc'\n" + AGG, "proposer 1: token: keys do not belong in config files"),
        ("source = 'x.toml'\n" + AGG, "source: unknown field"),
        ("description = 1\n" + AGG, "description: expected string, got int 1"),
        ("aggregater = 1\n" + AGG, "aggregater: unknown field (did you mean 'aggregator'?"),
        ("[proposers]\nmodel='a'\n" + AGG, "proposers: expected list, got dict"),
    ],
)
def test_more_config_mistakes_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(path)
    # no chained ValidationError, whose text would quote the values
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_unknown_field_hint_lists_the_known_fields(tmp_path: Path) -> None:
    path = write(tmp_path, P + "modle='b'\n" + AGG, "bad.toml")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "proposer 1: modle: unknown field (did you mean 'model'?" in message
    assert "known: model, base_url, api_key_env, temperature, max_tokens, seed, provider" in message


def test_yaml_non_string_keys_and_bools(tmp_path: Path) -> None:
    text = "1: 2\naggregator: {model: m, base_url: 'http://x'}\n"
    with pytest.raises(ConfigError, match=r"c\.yaml: 1: unknown field"):
        load_recipe(write(tmp_path, text, "c.yaml"))
    text = "layers: yes\naggregator: {model: m, base_url: 'http://x'}\n"
    with pytest.raises(ConfigError, match="layers: expected integer, got bool True"):
        load_recipe(write(tmp_path, text, "c.yaml"))


def test_programmatic_recipes_get_the_engine_checks() -> None:
    entry = ModelEntry(model="m", base_url="http://x")
    with pytest.raises(ConfigError, match="layers=2 needs at least one proposer"):
        Recipe(name="r", proposers=[], aggregator=entry, layers=2)
    with pytest.raises(ConfigError, match="min_proposers=3 is more than"):
        Recipe(name="r", proposers=[entry], aggregator=entry, min_proposers=3)
    recipe = Recipe(name="r", proposers=[entry], aggregator=entry, proposer_timeout=float("inf"))
    assert recipe.proposer_timeout is None and recipe.source is None


# ------------------------------------------------------------------ secrets


KEY_SHAPES = [
    "gsk_" + "A1b2C3d4E5f6G7h8J9k0LmNoPq",
    "tgp_v1_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2",
    "AIza" + "SyA1b2C3d4E5f6G7h8J9k0LmNoPqRsTu",
    "0123456789abcdef0123456789abcdef01234567",  # 40 hex characters
    "sk-proj-" + "Q1w2E3r4T5y6U7i8O9p0",
]


@pytest.mark.parametrize("key", KEY_SHAPES)
def test_a_key_pasted_into_model_is_not_echoed(tmp_path: Path, monkeypatch, key: str) -> None:
    # the model name shows up in the missing-key message (`aggregator (MODEL) needs...`)
    monkeypatch.delenv("MOA_TEST_UNSET_VAR", raising=False)
    text = f"layers = 1\n[aggregator]\nmodel='{key}'\nbase_url='http://x'\n"
    text += "api_key_env='MOA_TEST_UNSET_VAR'\n"
    recipe = load_recipe(write(tmp_path, text))
    with pytest.raises(ConfigError, match="needs an API key") as info:
        recipe.build_models()
    assert key not in str(info.value) and "MOA_TEST_UNSET_VAR" in str(info.value)


@pytest.mark.parametrize("key", KEY_SHAPES)
@pytest.mark.parametrize(
    ("field", "error"),
    [
        ("base_url", "aggregator.base_url: must start with http"),
        *((f, f"aggregator.{f}: ") for f in ["temperature", "seed", "provider", "max_tokens"]),
        ("api_key_env", "must be the NAME of an environment variable"),
    ],
)
def test_a_key_pasted_into_any_field_is_not_echoed(
    tmp_path: Path, field: str, error: str, key: str
) -> None:
    fields = {"model": "m", "base_url": "http://x", field: key}
    path = write(tmp_path, "[aggregator]\n" + "".join(f"{k}='{v}'\n" for k, v in fields.items()))
    with pytest.raises(ConfigError, match=error) as info:
        load_recipe(path)
    assert key not in str(info.value)


@pytest.mark.parametrize("key", KEY_SHAPES)
def test_a_key_as_recipe_name_or_unknown_field_is_not_echoed(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="unknown recipe") as info:
        load_recipe(key)
    assert key not in str(info.value)
    path = write(tmp_path, f'"{key}" = 1\n' + AGG, "k.toml")
    with pytest.raises(ConfigError, match="unknown field") as info:
        load_recipe(path)
    assert key not in str(info.value)


def test_direct_construction_errors_do_not_echo_values() -> None:
    from pydantic import ValidationError

    key = "sk-proj-" + "Q1w2E3r4T5y6U7i8O9p0"
    with pytest.raises(ValidationError) as info:
        ModelEntry(model="m", base_url="http://x", api_key_env=key)
    assert key not in str(info.value) and key not in repr(info.value)


def test_build_registers_the_key_variable_for_redaction(monkeypatch) -> None:
    value = secrets.token_hex(20)  # 40 hex characters
    monkeypatch.setenv("MY_KEY", value)
    ModelEntry(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY").build()
    assert value not in redact("provider said: Incorrect API key provided: " + value)


def test_build_redacts_a_variable_named_like_nothing_secret(monkeypatch) -> None:
    # neither the name nor the value match a pattern: only registration hides it
    name = f"MOA_UPSTREAM_{uuid.uuid4().hex[:8].upper()}"
    value = "plain-" + uuid.uuid4().hex[:12] + "-value"
    monkeypatch.setenv(name, value)
    assert value in redact("echo " + value)
    model = ModelEntry(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=name).build()
    assert model.openai_api_key.get_secret_value() == value
    assert value not in redact("echo " + value)


def test_a_failed_build_still_registers_the_variable(monkeypatch) -> None:
    name = f"MOA_UPSTREAM_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=name):
        ModelEntry(model="m", base_url="http://x", api_key_env=name).build()
    value = "plain-" + uuid.uuid4().hex[:12] + "-value"
    monkeypatch.setenv(name, value)  # set later, e.g. by a retrying caller
    assert value not in redact("echo " + value)


def test_frequency_penalty_reaches_the_client(tmp_path: Path) -> None:
    path = write(tmp_path, P + "frequency_penalty=0.4\n" + AGG)
    moa = ChatMoA.from_recipe(path)
    assert moa.proposers[0].frequency_penalty == 0.4
    assert moa.aggregator.frequency_penalty is None


# ------------------------------------------------ hostile config files, through the CLI


@pytest.fixture
def run_with_config(tmp_path: Path, capsys):
    """`moa generate IN OUT --config FILE`: (exit code, stderr); no model may be built."""
    from langchain_moa import cli

    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "q"}\n')
    out = tmp_path / "out.jsonl"

    def run(config: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(["generate", str(source), str(out), "--config", config])
        assert not out.exists()  # refused before any row
        return code, capsys.readouterr().err

    return run


def _one_error_line(code: int, err: str, path: str) -> str:
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"moa: error: {path}: ") and "Traceback" not in err
    return err.removeprefix(f"moa: error: {path}: ").rstrip("\n")


HUGE = "1" * 401
BOUNDS = [
    (f"layers = {HUGE}\n" + P + AGG, "layers: must be an integer from 1 to 10, got an integer "
     "of about 401 digits"),
    ("layers = 11\n" + P + AGG, "layers: must be an integer from 1 to 10, got 11"),
    (P + "temperature = inf\n" + AGG, "proposer 1: temperature: must be a number from 0 to 2, "
     "got inf"),
    (P + "temperature = 2.5\n" + AGG, "proposer 1: temperature: must be a number from 0 to 2, "
     "got 2.5"),
    (P + "timeout = 1e-300\n" + AGG, f"proposer 1: timeout: must be {SECONDS}, got 1e-300"),
    (P + "timeout = inf\n" + AGG, f"proposer 1: timeout: must be {SECONDS}, got inf"),
    (P + "timeout = 100000\n" + AGG, f"proposer 1: timeout: must be {SECONDS}, got 100000"),
    (P + "max_tokens = 1_000_000_000_000\n" + AGG, "proposer 1: max_tokens: must be an "
     "integer from 1 to 1000000, got 1000000000000"),
    (P + f"seed = {2**64}\n" + AGG, "proposer 1: seed: must be a 64-bit integer (from -2**63 "
     "to 2**63 - 1), got an integer of about 20 digits"),
    (P + "frequency_penalty = nan\n" + AGG, "proposer 1: frequency_penalty: must be a number "
     "from -2 to 2, got nan"),
    ("min_proposers = 100\n" + P + AGG, "min_proposers: must be an integer from 1 to 64, got 100"),
    ("layer_quorum = 1000\n" + P + AGG, "layer_quorum: must be an integer from 1 to 64, got 1000"),
    ("proposer_timeout = 1e-300\n" + P + AGG, f"proposer_timeout: must be {SECONDS}, or inf "
     "for no limit, got 1e-300"),
    ("proposer_timeout = -inf\n" + P + AGG, f"proposer_timeout: must be {SECONDS}, or inf "
     "for no limit, got -inf"),
    ("straggler_grace = inf\n" + P + AGG, "straggler_grace: must be a number from 0 to 100, "
     "got inf"),
    ("[label]\nsamples = 1000\n" + P + AGG, "label.samples: must be an integer from 2 to 32, "
     "got 1000"),
    (P * 65 + AGG, "proposers: at most 64 entries, got 65"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BOUNDS)
def test_every_number_in_a_config_file_has_a_documented_range(
    tmp_path: Path, run_with_config, text: str, message: str
) -> None:
    path = write(tmp_path, text, "bounds.toml")
    assert _one_error_line(*run_with_config(path), path) == message


def test_the_bounds_hold_in_yaml_too(tmp_path: Path, run_with_config) -> None:
    entry = "{model: m, base_url: 'http://x'}"
    path = write(tmp_path, f"layers: {HUGE}\nproposers: [{entry}]\naggregator: {entry}\n", "b.yaml")
    reason = _one_error_line(*run_with_config(path), path)
    assert reason == "layers: must be an integer from 1 to 10, got an integer of about 401 digits"
    path = write(tmp_path, f"proposers: [{entry}]\naggregator: {{model: m, base_url: "
                 "'http://x', timeout: .inf}\n", "c.yaml")  # fmt: skip
    reason = _one_error_line(*run_with_config(path), path)
    assert reason == f"aggregator.timeout: must be {SECONDS}, got inf"


def test_the_edges_of_the_ranges_load(tmp_path: Path) -> None:
    text = (
        "layers = 10\nmin_proposers = 1\nproposer_timeout = 0.1\nstraggler_grace = 100\n"
        "[label]\nsamples = 32\n" + P + "temperature = 2\ntimeout = 86400\nmax_tokens = 1000000\n"
        f"seed = {-(2**63)}\nfrequency_penalty = -2\n" + AGG
    )
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.layers == 10 and recipe.proposers[0].timeout == 86400
    assert recipe.label.samples == 32 and recipe.proposer_timeout == 0.1


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.toml", "x = " + "[" * 20_000 + "]" * 20_000 + "\n" + AGG),
        ("deep.yaml", "x: " + "[" * 20_000 + "]" * 20_000 + "\n"),
        ("blocks.yaml", "".join(" " * i + f"k{i}:\n" for i in range(3_000))),  # block style
        ("digits.toml", "layers = " + "9" * 5000 + "\n" + AGG),
        ("digits.yaml", "layers: " + "9" * 5000 + "\n"),
    ],
)
def test_a_config_file_too_deep_or_too_long_to_parse_is_one_line(
    tmp_path: Path, run_with_config, name: str, text: str
) -> None:
    path = write(tmp_path, text, name)
    reason = _one_error_line(*run_with_config(path), path)
    kind = "TOML" if name.endswith(".toml") else "YAML"
    if name.startswith("digits"):
        assert reason == f"invalid {kind}: a number has too many digits to read"
    else:
        assert reason == (
            f"invalid {kind}: nested too deeply to read (a config file needs only a few "
            "levels of tables)"
        )


RANDOM_KEY = "xk3mp9qr2vt7wy4za8bc"  # 20 characters, no shape the redactor knows
assert redact(RANDOM_KEY) == RANDOM_KEY


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("alias.yaml", f"layers: *{RANDOM_KEY}\n", "invalid YAML at line 1, column 9: found "
         "undefined alias '...'"),
        ("twice.toml", f"[{RANDOM_KEY}]\n[{RANDOM_KEY}]\n", "invalid TOML: Cannot declare "
         "('...',) twice (at line 2, column 22)"),
    ],
)  # fmt: skip
def test_a_random_key_in_a_parse_error_is_never_repeated(
    tmp_path: Path, run_with_config, name: str, text: str, message: str
) -> None:
    path = write(tmp_path, text, name)
    code, err = run_with_config(path)
    assert _one_error_line(code, err, path) == message and RANDOM_KEY not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"[aggregator]\nmodel='m'\nbase_url='http://x'\napi_key_env='{RANDOM_KEY}'\n",
         "aggregator.api_key_env: must be the NAME of an environment variable"),
        (f"layers = '{RANDOM_KEY}'\n" + AGG,
         "layers: expected integer, got a string of 20 characters (not repeated: it could be "
         "a key)"),
        (f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='http://x'\nprovider='{RANDOM_KEY}'\n",
         "aggregator.provider: must be one of openai-compatible, local, got a string of 20 "
         "characters"),
        (f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='{RANDOM_KEY}'\n",
         "aggregator.base_url: must start with http:// or https:// (e.g. "
         "https://api.together.xyz/v1)"),
        (f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='ftp://{RANDOM_KEY}'\n",
         "aggregator.base_url: must start with http:// or https://, got ftp://..."),
        (f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='http://x/{RANDOM_KEY} v1'\n",
         "aggregator.base_url: must not contain spaces or control characters"),
        (f"layers = 1\n{RANDOM_KEY} = 1\n" + AGG,
         "a field whose name is not repeated (it could be a key): unknown field"),
        (f"layers = 1\n[label]\nmode = '{RANDOM_KEY}'\n" + AGG,
         "label.mode: must be one of 'pairwise', 'pointwise' or 'likelihood', got a string of 20 "
         "characters"),
        (f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='http://x'\nseed='{RANDOM_KEY}'\n",
         "aggregator.seed: expected integer, got a string of 20 characters"),
    ],
)  # fmt: skip
def test_a_random_key_in_any_field_is_never_repeated(
    tmp_path: Path, run_with_config, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    code, err = run_with_config(path)
    assert _one_error_line(code, err, path).startswith(message)
    assert RANDOM_KEY not in err


def test_a_random_key_as_model_name_is_not_repeated(
    tmp_path: Path, run_with_config, monkeypatch
) -> None:
    monkeypatch.delenv("MOA_TEST_UNSET_VAR", raising=False)
    text = f"layers = 1\n[aggregator]\nmodel='{RANDOM_KEY}'\nbase_url='http://x'\n"
    text += "api_key_env='MOA_TEST_UNSET_VAR'\n"
    code, err = run_with_config(write(tmp_path, text))
    assert code == 2 and RANDOM_KEY not in err
    assert err == (
        "moa: error: aggregator needs an API key: set the environment variable MOA_TEST_UNSET_VAR\n"
    )


def test_a_random_key_as_recipe_name_is_not_repeated() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(RANDOM_KEY)
    assert RANDOM_KEY not in str(info.value)
    assert str(info.value).startswith("unknown recipe: choose one of local")
    with pytest.raises(ConfigError, match="unknown recipe 'gpt': choose"):
        load_recipe("gpt")  # a plain word is named


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{RANDOM_KEY}@127.0.0.1:9/v1",
        f"https://{RANDOM_KEY}@api.example.com/v1",
        f"http://:{RANDOM_KEY}@127.0.0.1:9",
    ],
)
def test_a_key_in_a_base_urls_userinfo_is_refused(
    tmp_path: Path, run_with_config, url: str
) -> None:
    path = write(tmp_path, f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='{url}'\n")
    code, err = run_with_config(path)
    assert _one_error_line(code, err, path) == (
        "aggregator.base_url: must not hold credentials (user:key@host); put the key in an "
        "environment variable and give its name with api_key_env"
    )
    assert RANDOM_KEY not in err


@pytest.mark.parametrize(
    "name", ["TOGETHER_API_KEY", "MY_KEY", "SCRIPTED_KEY", "my_key", "ACME_ACCESS", "KEY2"]
)
def test_ordinary_variable_names_are_accepted(tmp_path: Path, name: str) -> None:
    text = f"layers = 1\n[aggregator]\nmodel='m'\nbase_url='http://x'\napi_key_env='{name}'\n"
    assert load_recipe(write(tmp_path, text)).aggregator.api_key_env == name


@pytest.mark.parametrize(
    "model",
    ["meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", "Qwen/Qwen3-235B-A22B-Instruct-2507-tput",
     "llama3.1:8b", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M.gguf", "gpt-4o-mini"],
)  # fmt: skip
def test_model_names_are_still_named_in_the_missing_key_error(
    tmp_path: Path, monkeypatch, model: str
) -> None:
    monkeypatch.delenv("MOA_TEST_UNSET_VAR", raising=False)
    text = f"layers = 1\n[aggregator]\nmodel='{model}'\nbase_url='http://x'\n"
    text += "api_key_env='MOA_TEST_UNSET_VAR'\n"
    with pytest.raises(ConfigError, match=re.escape(f"aggregator ({model}) needs an API key")):
        load_recipe(write(tmp_path, text)).build_models()

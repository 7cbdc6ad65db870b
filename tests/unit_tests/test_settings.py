"""`MoASettings`: one declaration of the MoA settings, one `ConfigError` on every face."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from langchain_moa import ChatMoA, ConfigError, MoASettings, build_moa_graph
from langchain_moa.engine import MoAEngine
from langchain_moa.recipes import ModelEntry, Recipe
from langchain_moa.testing.fakes import ScriptedChatModel


def _models(n: int) -> dict[str, Any]:
    return {
        "proposers": [ScriptedChatModel(model_name=f"p{i}") for i in range(n)],
        "aggregator": ScriptedChatModel(model_name="agg"),
    }


def _chat_moa(n: int, settings: dict[str, Any]) -> None:
    ChatMoA(**_models(n), **settings)


def _graph(n: int, settings: dict[str, Any]) -> None:
    build_moa_graph(**_models(n), **settings)


def _graph_with_settings_object(n: int, settings: dict[str, Any]) -> None:
    build_moa_graph(**_models(n), settings=MoASettings(**settings))


def _engine(n: int, settings: dict[str, Any]) -> None:
    MoAEngine(**{k: tuple(v) if k == "proposers" else v for k, v in _models(n).items()},
              settings=MoASettings(**settings))  # fmt: skip


def _recipe(n: int, settings: dict[str, Any]) -> None:
    entry = ModelEntry(model="m", base_url="http://127.0.0.1:9/v1")
    Recipe(name="r", proposers=[entry] * n, aggregator=entry, **settings)


FACES: dict[str, Callable[[int, dict[str, Any]], None]] = {
    "ChatMoA": _chat_moa,
    "build_moa_graph": _graph,
    "build_moa_graph(settings=)": _graph_with_settings_object,
    "MoAEngine": _engine,
    "Recipe": _recipe,
}

BAD = [
    (2, {"layers": 0}, "layers must be at least 1, got 0"),
    (2, {"layers": True}, "layers must be an integer, got True"),
    (2, {"proposer_timeout": -1}, "proposer_timeout must be greater than 0, got -1"),
    (2, {"min_proposers": 0}, "min_proposers must be at least 1, got 0"),
    (
        2,
        {"min_proposers": 3},
        "min_proposers=3 is more than the 2 proposers given; lower min_proposers or add "
        "proposers",
    ),
    (0, {}, "layers=2 needs at least one proposer; pass proposers=[...] or use layers=1"),
    (
        3,
        {"layer_quorum": 4},
        "layer_quorum must be an integer from min_proposers (1) to the number of proposers "
        "(3), or None to wait for all; got 4",
    ),
    (2, {"straggler_grace": float("inf")}, "straggler_grace must be a finite number, got inf"),
    (
        2,
        {"early_stop": "unanimous"},
        "early_stop must be None, 'agreement' or a function of the layer's answers, "
        "got 'unanimous'",
    ),
    (
        2,
        {"reference_placement": "end"},
        "reference_placement must be 'first_system' or 'after_conversation', got 'end'",
    ),
]


@pytest.mark.parametrize("face", list(FACES))
@pytest.mark.parametrize(
    ("n_proposers", "settings", "message"), BAD, ids=[m.split(",")[0] for *_, m in BAD]
)
def test_every_face_raises_the_same_config_error(
    face: str, n_proposers: int, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        FACES[face](n_proposers, settings)
    assert str(info.value) == message
    assert info.value.__cause__ is None and info.value.__context__ is None  # one line, no chain


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)  # existing `except ValueError` keeps working


def test_every_face_accepts_the_same_good_settings() -> None:
    settings = {"layers": 3, "min_proposers": 2, "layer_quorum": 2, "proposer_timeout": 30,
                "early_stop": "agreement", "reference_placement": "after_conversation"}  # fmt: skip
    moa = ChatMoA(**_models(2), **settings)
    graph = build_moa_graph(**_models(2), **settings)
    entry = ModelEntry(model="m", base_url="http://127.0.0.1:9/v1")
    recipe = Recipe(name="r", proposers=[entry] * 2, aggregator=entry, **settings)
    expected = MoASettings(**settings)
    for holder in (moa, graph.moa_engine.settings, recipe, moa.engine.settings):
        assert {name: getattr(holder, name) for name in MoASettings.model_fields} == dict(
            expected
        )


def test_infinite_proposer_timeout_is_no_limit_everywhere() -> None:
    assert MoASettings(proposer_timeout=float("inf")).proposer_timeout is None
    assert ChatMoA(**_models(1), proposer_timeout=float("inf")).proposer_timeout is None


def test_unknown_settings_are_named_with_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        build_moa_graph(**_models(2), layer=3)
    assert str(info.value).startswith("unknown MoA setting 'layer' (did you mean 'layers'? known:")
    with pytest.raises(ConfigError, match="either as settings=MoASettings"):
        build_moa_graph(**_models(2), settings=MoASettings(), layers=3)


def test_settings_are_frozen_values() -> None:
    settings = MoASettings(layers=3)
    with pytest.raises(ValueError):
        settings.layers = 0  # type: ignore[misc]
    assert settings.proposer_layers == 2


def test_chat_moa_takes_its_fields_from_moa_settings() -> None:
    """One declaration: ChatMoA's MoA fields are MoASettings' own (default and docs)."""
    for name, info in MoASettings.model_fields.items():
        mine = ChatMoA.model_fields[name]
        assert (mine.annotation, mine.default, mine.description) == (
            info.annotation,
            info.default,
            info.description,
        )

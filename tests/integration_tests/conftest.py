"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

Member = tuple[float, int, int]  # temperature, seed, max_tokens


@pytest.fixture(scope="session")
def local_recipe() -> Callable[[list[Member], Member], str]:
    """``local_recipe(proposers, aggregator)``: the TOML of a two-layer recipe whose members
    all run the local model, each given as ``(temperature, seed, max_tokens)``."""

    def member(table: str, temperature: float, seed: int, max_tokens: int) -> str:
        return (
            f'{table}\nprovider = "local"\ntemperature = {temperature}\nseed = {seed}\n'
            f"max_tokens = {max_tokens}\n"
        )

    def recipe(proposers: list[Member], aggregator: Member) -> str:
        tables = [member("[[proposers]]", *p) for p in proposers]
        return "layers = 2\n" + "".join(tables) + member("[aggregator]", *aggregator)

    return recipe

"""Shared pytest configuration.

Cassettes (pytest-recording / vcrpy) are replayed with the default record mode "none":
no request leaves the process. They match on method, path and body, never on host or
port, because recordings are made against loopback servers on ephemeral ports.
Authorization headers are never written to a cassette.

Tests marked ``local_model`` run the bundled SmolLM2 through the in-process llama.cpp
server; where the model was never pulled they are skipped, saying so (``moa pull``).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def vcr_config() -> dict:
    return {
        "filter_headers": [
            ("authorization", "REDACTED"),
            ("api-key", "REDACTED"),
            ("x-api-key", "REDACTED"),
        ],
        "match_on": ["method", "path", "query", "body"],
        "decode_compressed_response": True,
        # benchmarks replay the same recorded exchange many times
        "allow_playback_repeats": True,
    }


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("local_model") is None:
        return
    from langchain_moa.local import LocalModelNotFoundError, resolve_model_path

    try:
        resolve_model_path()
    except LocalModelNotFoundError as exc:
        pytest.skip(f"needs the local model: {exc}")

"""Shared pytest configuration.

Cassettes (pytest-recording / vcrpy) are replayed with the default record mode "none":
no request leaves the process. They match on method, path and body, never on host or
port, because recordings are made against loopback servers on ephemeral ports.
Authorization headers are never written to a cassette.
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

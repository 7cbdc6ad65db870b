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


class FakeHub:
    """A loopback stand-in for the Hugging Face Hub serving a few files (HEAD and GET of
    ``/{repo}/resolve/main/{file}``, datasets under ``/datasets/``), as `hf_hub_download`
    asks for them. `requests` records every request's method and path."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    def add(self, repo_id: str, filename: str, data: bytes, repo_type: str = "model") -> None:
        prefix = "/datasets" if repo_type == "dataset" else ""
        self.files[f"{prefix}/{repo_id}/resolve/main/{filename}"] = data


@pytest.fixture
def fake_hub():
    import hashlib
    import http.server
    import threading

    hub = FakeHub()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> bytes | None:
            hub.requests.append((self.command, self.path))
            data = hub.files.get(self.path.split("?", 1)[0])
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("X-Repo-Commit", FakeHub.COMMIT)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            data = self._headers()
            if data is not None:
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("local_model") is None:
        return
    from langchain_moa.local import LocalModelNotFoundError, resolve_model_path

    try:
        resolve_model_path()
    except LocalModelNotFoundError as exc:
        pytest.skip(f"needs the local model: {exc}")

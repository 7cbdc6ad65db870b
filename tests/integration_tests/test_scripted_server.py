"""The scripted test server's own behaviour (langchain_moa.testing.server), over HTTP."""

from __future__ import annotations

import httpx
import pytest

from langchain_moa.testing import serve_in_subprocess

pytestmark = pytest.mark.http


def test_the_scripted_server_runs_in_its_own_process_for_load_benchmarks() -> None:
    base_url, process = serve_in_subprocess({"m": {"reply": "hello", "lognormal": [0.01, 0.1]}})
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        reply = httpx.post(base_url + "/chat/completions", json=body, timeout=30).json()
        assert reply["choices"][0]["message"]["content"] == "hello"
        assert base_url.startswith("http://127.0.0.1:")
    finally:
        process.terminate()
        process.wait(timeout=30)

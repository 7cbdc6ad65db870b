"""`moa serve`: ChatMoA behind a real LangServe route, called over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, free_port

pytest.importorskip("langserve", reason="the 'serve' extra is not installed")
pytestmark = pytest.mark.http


def test_moa_serve_invoke_and_stream(tmp_path: Path) -> None:
    scripts = {
        "p1": ModelScript(reply="draft"),
        "agg": ModelScript(reply="served answer", token_delay=0.01),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        cfg = tmp_path / "cfg.toml"
        entry = f'base_url = "{server.base_url}"\napi_key_env = "SCRIPTED_KEY"\n'
        cfg.write_text(f'[[proposers]]\nmodel = "p1"\n{entry}[aggregator]\nmodel = "agg"\n{entry}')
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "langchain_moa.cli", "serve", "--config", str(cfg),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "SCRIPTED_KEY": "sk-scripted-test"},
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}/moa"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{base}/input_schema", timeout=2)
                    break
                except httpx.HTTPError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "moa serve did not start"
                    time.sleep(0.2)
            reply = httpx.post(f"{base}/invoke", json={"input": "hello"}, timeout=30).json()
            output = reply["output"]
            assert output["content"] == "served answer"
            assert (
                output["response_metadata"]["moa"]["layers"][0]["proposals"][0]["answer"] == "draft"
            )
            assert "sk-scripted-test" not in str(reply)
            with httpx.stream("POST", f"{base}/stream", json={"input": "hello"}, timeout=30) as r:
                body = "".join(r.iter_text())
            assert "event: data" in body and "served " in body and "event: end" in body
        finally:
            proc.terminate()
            proc.wait(timeout=10)

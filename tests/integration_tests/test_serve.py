"""`moa serve`: ChatMoA behind a real LangServe route, called over HTTP on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, start_moa_serve

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
        base, proc = start_moa_serve(cfg, env={"SCRIPTED_KEY": "sk-scripted-test"})
        try:
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

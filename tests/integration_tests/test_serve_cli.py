"""`moa serve` as users start it: the port is checked before the models load, `GET /health`
answers without a key or a model call, and every request gets one access log line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from langchain_moa import ChatMoA
from langchain_moa.server import ServeLimits, create_app
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, start_moa_serve
from langchain_moa.testing.fakes import ScriptedChatModel

pytest.importorskip("langserve", reason="the 'serve' extra is not installed")

SERVE_KEY = "serve-key-for-health-tests-0123456789"
QUERY_SECRET = "query-secret-never-logged-42"


def run_moa(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", *argv],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def scripted_config(tmp_path: Path) -> Iterator[Path]:
    with ScriptedOpenAIServer(scripts={"p1": ModelScript(reply="d"), "agg": ModelScript(
        reply="the answer")}) as server:  # fmt: skip
        entry = f'base_url = "{server.base_url}"\napi_key_env = "SCRIPTED_KEY"\n'
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(f'[[proposers]]\nmodel = "p1"\n{entry}[aggregator]\nmodel = "agg"\n{entry}')
        yield cfg


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_out_of_range_is_a_usage_error(port: str) -> None:
    done = run_moa("serve", "--port", port)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: moa serve ")
    assert done.stderr.strip().splitlines()[-1].startswith(
        "moa serve: error: argument --port: must be"
    )
    assert "Traceback" not in done.stderr and "serving" not in done.stderr


def test_a_port_in_use_fails_in_one_line_before_any_model_loads(
    taken_port: int, tmp_path: Path
) -> None:
    # Building this config's models would fail (its key is unset): the port is checked first.
    cfg = tmp_path / "cfg.toml"
    entry = 'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "MOA_TEST_NEVER_SET_KEY"\n'
    cfg.write_text(f'layers = 1\n[aggregator]\nmodel = "agg"\n{entry}')
    env = {k: v for k, v in os.environ.items() if k != "MOA_TEST_NEVER_SET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "serve", "--config", str(cfg),
         "--port", str(taken_port)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"moa: error: cannot serve on 127.0.0.1:{taken_port}: Address already in use; pass a "
        "free --port, or a --host this machine has"
    ]


async def test_health_needs_no_key_and_is_not_a_run() -> None:
    model = ScriptedChatModel(reply="x")
    app = create_app(
        {"m": ChatMoA(aggregator=model, layers=1)},
        api_key=SERVE_KEY, limits=ServeLimits(max_runs=1, max_queue=0),
    )  # fmt: skip
    limiter = app.limiter
    assert limiter.try_admit(1)  # the server is full: every run slot taken
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://moa"
    ) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (await client.get("/v1/models")).status_code == 401  # the rest still needs it
        assert (await client.post("/health", json={})).status_code == 401
    assert limiter.admitted == 1 and model.calls == []


def test_serve_answers_health_and_logs_one_line_per_request(scripted_config: Path) -> None:
    base, proc = start_moa_serve(
        scripted_config, env={"SCRIPTED_KEY": "sk-scripted", "MOA_SERVE_API_KEY": SERVE_KEY}
    )
    root = base.removesuffix("/moa")
    try:
        health = httpx.get(f"{root}/health", timeout=10)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        refused = httpx.get(f"{root}/v1/models?api_key={QUERY_SECRET}", timeout=10)
        assert refused.status_code == 401
        answered = httpx.post(
            f"{root}/v1/chat/completions",
            json={"model": "cfg", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {SERVE_KEY}"},
            timeout=30,
        )
        assert answered.status_code == 200, answered.text
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    access = [line for line in stderr.splitlines() if "langchain_moa.access" in line]
    health_lines = [line for line in access if " /health " in line]
    assert len(health_lines) == 1, stderr
    assert health_lines[0].startswith("INFO langchain_moa.access: GET /health 200 ")
    assert health_lines[0].endswith(" ms")
    assert [line for line in access if " /v1/models " in line][0].split()[2:5] == [
        "GET", "/v1/models", "401"
    ]
    assert [line for line in access if "/v1/chat/completions" in line][0].split()[2:5] == [
        "POST", "/v1/chat/completions", "200"
    ]
    assert QUERY_SECRET not in stderr and SERVE_KEY not in stderr
    assert "HTTP/1.1" not in stderr  # uvicorn's own access log is off: one line per request

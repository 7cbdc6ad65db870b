"""`moa serve` against hostile and careless clients: malformed bodies, every route under
the same limits, hung upstreams, slow bodies, weak keys, the embedded model's slots.

In-process checks run the app through httpx's ASGI transport (fake models, no sockets);
the limits are checked on `moa serve` as users start it, against the scripted upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from langchain_moa import ChatMoA
from langchain_moa.server import ServeLimits, create_app
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, free_port, start_moa_serve
from langchain_moa.testing.fakes import ScriptedChatModel

pytest.importorskip("langserve", reason="the 'serve' extra is not installed")

UPSTREAM_KEY = "sk-scripted-hardening"
HI = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- in-process app


def fake_moa() -> ChatMoA:
    return ChatMoA(
        proposers=[ScriptedChatModel(reply="draft one"), ScriptedChatModel(reply="draft two")],
        aggregator=ScriptedChatModel(reply="the answer"),
    )


@pytest.fixture
def fake() -> ChatMoA:
    return fake_moa()


@pytest.fixture
def client(fake: ChatMoA) -> httpx.AsyncClient:
    app = create_app({"fake": fake}, limits=ServeLimits(max_batch=3))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa")


def no_unplanned_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": HI, **fields}


MALFORMED = [
    # (what is sent, the param the 400 names)
    (body(temperature="hot"), "temperature"),
    (body(temperature=5), "temperature"),
    (body(max_tokens=-5), "max_tokens"),
    (body(max_tokens="abc"), "max_tokens"),
    (body(max_completion_tokens=0), "max_completion_tokens"),
    (body(stop=5), "stop"),
    (body(stream="false"), "stream"),
    (body(stream_options="yes", stream=True), "stream_options"),
    (body(stream_options=[1], stream=True), "stream_options"),
    (body(moa="drafts"), "moa"),
    (body(moa=[True]), "moa"),
    (body(response_format="json"), "response_format"),
    (body(response_format={"type": "xml"}), "response_format.type"),
    (body(n=2), "n"),
    (body(n="1"), "n"),
    (body(tools=[{"type": "function"}]), "tools[0].function"),
    (body(tool_choice=5), "tool_choice"),
    (body(top_p=[0.5]), "top_p"),
    ({"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "fake", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "fake", "messages": "hi"}, "messages"),
    ({"model": 5, "messages": HI}, "model"),
    ({"messages": HI}, "model"),
    (body(max_tokens=5, max_completion_tokens=6), "max_tokens"),
]


@pytest.mark.parametrize(("sent", "param"), MALFORMED)
async def test_malformed_fields_are_a_400_naming_the_field(
    client: httpx.AsyncClient, fake: ChatMoA, sent: dict, param: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    response = await client.post("/v1/chat/completions", json=sent)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]
    assert not fake.aggregator.calls  # nothing went upstream
    no_unplanned_errors(caplog)


RAW_MALFORMED = [
    # bodies a JSON library makes but no client should send (and no model should see)
    ('{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "/v1/chat/completions", "temperature"),
    ('{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "/v1/chat/completions", "messages[0].content"),
    ('{"input": "\\udfff"}', "/moa/invoke", "input"),
    ('{"inputs": [1e999]}', "/moa/batch", "inputs[0]"),
    ("[" * 100_000 + "]" * 100_000, "/v1/chat/completions", None),
    ('{"input": ' + "[" * 100 + "]" * 100 + "}", "/moa/invoke", None),
    ('{"inputs": 5}', "/moa/batch", "inputs"),
    ('{"inputs": null}', "/moa/batch", "inputs"),
    ("null", "/moa/batch", "inputs"),
    ("not json", "/v1/chat/completions", None),
    ('"a string"', "/v1/chat/completions", None),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "path", "param"), RAW_MALFORMED)
async def test_malformed_json_on_every_route_is_a_400(
    client: httpx.AsyncClient, fake: ChatMoA, raw: str, path: str, param: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    response = await client.post(path, content=raw.encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert not fake.aggregator.calls
    no_unplanned_errors(caplog)


async def test_model_dump_history_is_accepted(client: httpx.AsyncClient, fake: ChatMoA) -> None:
    """A response's message as `model_dump()` gives it (null audio, refusal, function_call,
    tool_calls, annotations) is a valid history entry."""
    dumped = {"role": "assistant", "content": "earlier answer", "audio": None, "refusal": None,
              "function_call": None, "tool_calls": None, "annotations": None}  # fmt: skip
    messages = [*HI, dumped, {"role": "user", "content": "and now?"}]
    response = await client.post("/v1/chat/completions", json=body(messages=messages))
    assert response.status_code == 200, response.text
    sent = fake.aggregator.calls[-1]
    assert any(m.content == "earlier answer" and not m.additional_kwargs for m in sent)


async def test_n_null_is_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=body(n=None))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "the answer"


async def test_unknown_routes_and_methods_answer_openai_errors(client: httpx.AsyncClient) -> None:
    for method, path, status in [
        ("GET", "/v1/models/nope", 404), ("POST", "/v1/responses", 404),
        ("POST", "/v1/completions", 404), ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
        ("POST", "/moa/stream_log", 404), ("POST", "/moa/stream_events", 404),
        ("POST", "/moa/c/N4XyA/invoke", 404), ("GET", "/moa/playground/", 404),
    ]:  # fmt: skip
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == status, (method, path, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", path
    assert (await client.get("/v1/models/nope")).json()["error"]["code"] == "model_not_found"
    found = await client.get("/v1/models/fake")
    assert found.json() == {"id": "fake", "object": "model", "created": 0,
                            "owned_by": "langchain-moa"}  # fmt: skip


async def test_an_unplanned_error_is_an_openai_500_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from langchain_core.runnables import RunnableLambda

    async def boom(_: Any) -> Any:  # a bug, not a provider error (those are 502s)
        raise KeyError("an unplanned bug")

    app = create_app({"boom": RunnableLambda(boom)})
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://moa") as client:
        for path, sent in [("/v1/chat/completions", {"model": "boom", "messages": HI}),
                           ("/moa/invoke", {"input": "hi"})]:  # fmt: skip
            caplog.clear()
            response = await client.post(path, json=sent)
            assert response.status_code == 500, (path, response.text)
            assert response.json()["error"]["type"] == "server_error"
            assert "Traceback" not in response.text and "KeyError" not in response.text
            lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1 and "KeyError" in lines[0].getMessage(), caplog.text
            assert lines[0].exc_info is None and "Traceback" not in caplog.text
        streamed = {"model": "boom", "messages": HI, "stream": True}
        stream = await client.post("/v1/chat/completions", json=streamed)
        events = [line for line in stream.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["type"] == "server_error"
        assert events[-1] == "data: [DONE]"


async def test_usage_reports_cached_and_reasoning_tokens() -> None:
    from langchain_core.messages import AIMessage

    from langchain_moa.server import completion_body

    message = AIMessage(content="", tool_calls=[{"name": "f", "args": {}, "id": "c1"}],
                        usage_metadata={"input_tokens": 10, "output_tokens": 5,
                                        "total_tokens": 15,
                                        "input_token_details": {"cache_read": 4},
                                        "output_token_details": {"reasoning": 2}})  # fmt: skip
    completion = completion_body(message, "m", drafts=False)
    assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert completion["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert completion["choices"][0]["message"]["content"] is None  # OpenAI: null, not ""
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------- the embedded model's slots


def test_runs_on_the_local_model_are_bounded_by_its_slots(monkeypatch) -> None:
    from langchain_openai import ChatOpenAI

    from langchain_moa import local
    from langchain_moa.server import local_run_bound

    server = local.LocalServer(Path("smol.gguf"), n_parallel=4)
    server.base_url = "http://127.0.0.1:9/v1"
    monkeypatch.setitem(local._SERVERS, ("smol.gguf", 4), server)

    def on(url: str) -> ChatOpenAI:
        return ChatOpenAI(model="m", base_url=url, api_key="x")

    three_local = ChatMoA(proposers=[on(server.base_url)] * 3, aggregator=on(server.base_url))
    remote = ChatMoA(proposers=[on("http://127.0.0.1:8/v1")] * 3,
                     aggregator=on("http://127.0.0.1:8/v1"))  # fmt: skip
    assert local_run_bound({"local": three_local}) == (1, "4 local slots / 3 local calls per run")
    two_local = ChatMoA(proposers=[on(server.base_url)] * 2, aggregator=on(server.base_url))
    assert local_run_bound({"a": two_local, "b": remote}) == (
        2, "4 local slots / 2 local calls per run",
    )  # fmt: skip
    assert local_run_bound({"remote": remote}) is None


# ------------------------------------------------------------- moa serve, for real


def entry(server: ScriptedOpenAIServer, model: str) -> str:
    return f'model = "{model}"\nbase_url = "{server.base_url}"\napi_key_env = "SCRIPTED_KEY"\n'


def write_config(path: Path, server: ScriptedOpenAIServer, proposers: list[str],
                 aggregator: str, layers: int = 1) -> Path:  # fmt: skip
    text = f'name = "{path.stem}"\nlayers = {layers + 1}\n' + "".join(
        "[[proposers]]\n" + entry(server, p) for p in proposers
    )
    path.write_text(text + "[aggregator]\n" + entry(server, aggregator))
    return path


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="draft one", latency=0.3),
        "p2": ModelScript(reply="draft two", latency=0.3),
        "agg": ModelScript(reply="the answer"),
        "hung": ModelScript(reply="never in time", latency=20),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        yield server


def serve(config: Path, *args: str) -> tuple[str, subprocess.Popen]:
    base, process = start_moa_serve(config, env={"SCRIPTED_KEY": UPSTREAM_KEY}, args=args)
    return base.removesuffix("/moa"), process


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert UPSTREAM_KEY not in err and "Traceback" not in err, err
    return err


def most_in_flight(upstream: ScriptedOpenAIServer, since: float) -> int:
    """The most upstream calls that overlapped, from the recorded start/finish times."""
    edges = []
    for r in upstream.requests:
        if r.started >= since:
            edges += [(r.started, 1), (r.finished or time.perf_counter(), -1)]
    level = peak = 0
    for _, step in sorted(edges):
        level += step
        peak = max(peak, level)
    return peak


ROUTES = [
    ("/v1/chat/completions", {"model": "bounded", "messages": HI}),
    ("/v1/chat/completions", {"model": "bounded", "messages": HI, "stream": True}),
    ("/moa/invoke", {"input": "hi"}),
    ("/moa/stream", {"input": "hi"}),
    ("/moa/batch", {"inputs": ["hi"]}),
]


def test_every_route_is_bounded_by_the_same_limits(
    upstream: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    """--max-runs 2 --max-queue 0, 6 requests at once on each route: 2 run, 4 get 429, and
    never more than 2 runs x 2 proposers are upstream at once."""
    config = write_config(tmp_path / "bounded.toml", upstream, ["p1", "p2"], "agg")
    root, process = serve(config, "--max-runs", "2", "--max-queue", "0")

    async def burst(path: str, sent: dict) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            replies = await asyncio.gather(*(http.post(root + path, json=sent) for _ in range(6)))
        for reply in replies:
            if reply.status_code == 429:
                assert reply.json()["error"]["type"] == "rate_limit_error"
        return sorted(r.status_code for r in replies)

    try:
        for path, sent in ROUTES:
            since = time.perf_counter()
            assert asyncio.run(burst(path, sent)) == [200, 200, 429, 429, 429, 429], path
            assert most_in_flight(upstream, since) <= 4, path
        since = time.perf_counter()
        two = asyncio.run(burst("/moa/batch", {"inputs": ["a", "b"]}))
        assert two == [200, 429, 429, 429, 429, 429]  # a batch of 2 is 2 runs
        assert most_in_flight(upstream, since) <= 4
        for path in ("/moa/stream_log", "/moa/stream_events", "/moa/c/N4XyA/invoke",
                     "/moa/c/N4XyA/stream_events", "/moa/c/N4XyA/batch"):  # fmt: skip
            sent = {"inputs": ["hi"]} if path.endswith("batch") else {"input": "hi"}
            assert httpx.post(root + path, json=sent).status_code == 404, path
    finally:
        stop(process)


def test_a_hung_upstream_meets_the_request_deadline(
    upstream: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    """A proposer that never answers: 504 at --request-timeout, the slot is freed, the
    run is stopped (its next layer never starts)."""
    hung = write_config(tmp_path / "hung.toml", upstream, ["hung"], "agg", layers=2)
    fine = write_config(tmp_path / "fine.toml", upstream, ["p1"], "agg")
    root, process = serve(hung, "--config", str(fine), "--request-timeout", "1",
                          "--max-runs", "1", "--max-queue", "4")  # fmt: skip
    try:
        started = time.monotonic()
        question = [{"role": "user", "content": "are you there"}]
        reply = httpx.post(f"{root}/v1/chat/completions", json={"model": "hung",
                           "messages": question}, timeout=30)  # fmt: skip
        assert reply.status_code == 504 and time.monotonic() - started < 10
        assert reply.json()["error"]["code"] == "request_timeout"
        assert "request timeout (1 s)" in reply.json()["error"]["message"]
        sent = {"model": "hung", "messages": question, "stream": True}
        with httpx.stream("POST", f"{root}/v1/chat/completions", json=sent, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        assert lines[-1] == "data: [DONE]"
        with httpx.stream("POST", f"{root}/moa/stream", json={"input": "x"}, timeout=30) as r:
            text = "".join(r.iter_text())
        assert "event: error" in text and '"status_code": 504' in text
        # the one slot is free again: another model answers at once
        ok = httpx.post(f"{root}/v1/chat/completions", json={"model": "fine", "messages": HI},
                        timeout=30)  # fmt: skip
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        asked = [r.model for r in upstream.requests
                 if r.messages and r.messages[-1].get("content") == "are you there"]  # fmt: skip
        assert set(asked) == {"hung"}  # layer 2 and the aggregator never started
    finally:
        stop(process)


def test_a_slow_body_is_cut_off_with_408(upstream: ScriptedOpenAIServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "slowbody.toml", upstream, ["p1"], "agg")
    root, process = serve(config, "--body-timeout", "1")
    try:
        port = int(root.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            sock.sendall(head + b"Content-Type: application/json\r\n\r\n{")  # 1 of 100 bytes
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):  # the server closes the connection
                answer += chunk
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5
        assert "did not arrive within 1 s" in answer
    finally:
        stop(process)


def test_a_short_key_on_a_public_host_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[aggregator]\nprovider = "local"\n')
    result = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "serve", "--config", str(cfg),
         "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MOA_SERVE_API_KEY": "x"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(
        "moa: error: MOA_SERVE_API_KEY is 1 characters: a key for a public host needs at least 16"
    )
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.local_model
def test_the_local_recipe_queues_instead_of_timing_out_inside() -> None:
    """`--recipe local` on the embedded model's 4 slots: one run at a time (3 proposers
    each), the rest queue; 6 requests at once all get their answer, none a 502."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", "serve", "--recipe", "local",
         "--max-tokens", "6", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{root}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)

        async def burst() -> list[int]:
            sent = {"model": "local", "messages": [{"role": "user", "content": "Say hi."}]}
            async with httpx.AsyncClient(timeout=300) as http:
                replies = await asyncio.gather(
                    *(http.post(f"{root}/v1/chat/completions", json=sent) for _ in range(6))
                )
            return [r.status_code for r in replies]

        assert asyncio.run(burst()) == [200] * 6
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    assert "limits: 1 run at once (4 local slots / 3 local calls per run)" in err, err
    assert "Traceback" not in err

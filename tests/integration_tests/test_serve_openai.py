"""`moa serve` as users start it (a subprocess on 127.0.0.1), called as users call it: the
official `openai` client, `ChatOpenAI` pointed at it, LangServe's `RemoteRunnable`, curl,
and a real headless browser for the inspector page."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, free_port, start_moa_serve

pytest.importorskip("langserve", reason="the 'serve' extra is not installed")
pytestmark = pytest.mark.http

UPSTREAM_KEY = "sk-scripted-test"
SERVE_KEY = "moa-serve-test-key-123"


def entry(server: ScriptedOpenAIServer, model: str) -> str:
    return f'model = "{model}"\nbase_url = "{server.base_url}"\napi_key_env = "SCRIPTED_KEY"\n'


def write_config(path: Path, server: ScriptedOpenAIServer, name: str, proposers: list[str],
                 aggregator: str, extra: str = "") -> Path:  # fmt: skip
    text = f'name = "{name}"\nlayers = 2\n{extra}' + "".join(
        "[[proposers]]\n" + entry(server, p) for p in proposers
    )
    path.write_text(text + "[aggregator]\n" + entry(server, aggregator))
    return path


def poison_aware(body: dict) -> str:
    if "poison" in body["messages"][-1]["content"]:
        raise RuntimeError("scripted upstream failure")
    return "final answer"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="draft one", latency=0.05),
        "p2": ModelScript(reply="draft two", latency=0.05),
        "agg": ModelScript(reply="the served answer", token_delay=0.005),
        "aggtool": ModelScript(
            reply="no tool", tool_calls=[{"name": "multiply", "arguments": {"a": 17, "b": 23}}]
        ),
        "aggbad": ModelScript(fail_always=True, fail_status=500),
        "slow": ModelScript(reply="slow draft", latency=1.0),
        "aggpoison": ModelScript(reply=poison_aware),
        "pbad": ModelScript(fail_always=True, fail_status=500),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        yield server


@pytest.fixture(scope="module")
def served(upstream: ScriptedOpenAIServer, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("serve")
    configs = [
        write_config(folder / "alpha.toml", upstream, "alpha", ["p1", "p2"], "agg"),
        write_config(folder / "tools.toml", upstream, "tools", ["p1"], "aggtool"),
        write_config(folder / "broken.toml", upstream, "broken", ["p1"], "aggbad",
                     "min_proposers = 1\n"),  # fmt: skip
        write_config(folder / "slow.toml", upstream, "slow", ["slow"], "agg"),
        write_config(folder / "flaky.toml", upstream, "flaky", ["p1", "pbad"], "agg",
                     "min_proposers = 1\n"),  # fmt: skip
    ]  # fmt: skip
    extra = [a for c in configs[1:] for a in ("--config", str(c))]
    base, process = start_moa_serve(configs[0], env={"SCRIPTED_KEY": UPSTREAM_KEY}, args=extra)
    root = base.removesuffix("/moa")
    yield root
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert UPSTREAM_KEY not in err and "Traceback" not in err, err


def openai_client(root: str, key: str = "unused") -> Any:
    import openai

    return openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0)


# --------------------------------------------------------------- OpenAI-compatible


def test_models_lists_every_served_moa(served: str) -> None:
    ids = [m.id for m in openai_client(served).models.list().data]
    assert ids == ["alpha", "tools", "broken", "slow", "flaky"]


def test_openai_client_gets_the_answer_and_usage_of_every_call(served: str) -> None:
    response = openai_client(served).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}],
        extra_body={"moa": {"drafts": True}},
    )  # fmt: skip
    assert response.choices[0].message.content == "the served answer"
    assert response.choices[0].finish_reason == "stop" and response.model == "alpha"
    moa = response.model_extra["moa"]
    drafts = [p["answer"] for p in moa["layers"][0]["proposals"]]
    assert drafts == ["draft one", "draft two"]
    every_call = [p["usage"] for p in moa["layers"][0]["proposals"]] + [moa["aggregator"]["usage"]]
    assert response.usage.total_tokens == sum(u["total_tokens"] for u in every_call) > 0


def test_openai_stream_with_usage(served: str) -> None:
    chunks = list(
        openai_client(served).chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "the served answer"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_draft_events_arrive_before_the_answer(served: str) -> None:
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "moa": {"drafts": True}}  # fmt: skip
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    drafts = [e for e in events if e.get("object") == "moa.draft"]
    assert sorted((d["proposer"], d["answer"]) for d in drafts) == [
        (1, "draft one"), (2, "draft two"),
    ]  # fmt: skip
    assert all(d["model"] in ("p1", "p2") and d["latency_s"] > 0 and d["tokens"] for d in drafts)
    first_text = next(i for i, e in enumerate(events) if e.get("choices")
                      and e["choices"][0]["delta"].get("content"))  # fmt: skip
    assert max(events.index(d) for d in drafts) < first_text


def test_call_options_go_to_the_aggregator(served: str, upstream: ScriptedOpenAIServer) -> None:
    before = len(upstream.requests_for("agg"))
    openai_client(served).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "options"}],
        temperature=0.1, max_tokens=7, stop=["END"],
    )  # fmt: skip
    sent = upstream.requests_for("agg")[before:][-1].body
    limit = sent.get("max_completion_tokens", sent.get("max_tokens"))  # ChatOpenAI renames it
    assert (sent["temperature"], limit, sent["stop"]) == (0.1, 7, ["END"])


def test_chat_openai_pointed_at_the_server_calls_tools(served: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    model = ChatOpenAI(model="tools", base_url=f"{served}/v1", api_key="unused", max_retries=0)
    message = model.bind_tools([multiply], tool_choice="multiply").invoke("17 times 23?")
    assert message.tool_calls[0]["name"] == "multiply"
    assert message.tool_calls[0]["args"] == {"a": 17, "b": 23}
    assert multiply.invoke(message.tool_calls[0]["args"]) == 391


def test_errors_are_openai_error_json(served: str) -> None:
    import openai

    client = openai_client(served)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="alpha", messages=[])
    assert "'messages' must be a non-empty list" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "model 'nope' is not served here; served: alpha, tools, broken, slow, flaky" in str(
        missing.value
    )
    with pytest.raises(openai.APIStatusError) as upstream_failed:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert upstream_failed.value.status_code == 502
    text = upstream_failed.value.response.text
    assert "aggregator (aggbad)" in text and UPSTREAM_KEY not in text and "Traceback" not in text
    assert upstream_failed.value.body["type"] == "upstream_error"


def test_max_completion_tokens_caps_the_answer(served: str, upstream: ScriptedOpenAIServer) -> None:
    """What `ChatOpenAI(max_tokens=...)` and pydantic-ai send: the aggregator's cap."""
    before = len(upstream.requests_for("agg"))
    response = openai_client(served).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "cap me"}], max_completion_tokens=2
    )
    sent = upstream.requests_for("agg")[before:][-1].body
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 2
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == "the served "


def test_chat_openai_max_tokens_reaches_the_aggregator(served: str) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="alpha", base_url=f"{served}/v1", api_key="unused", max_tokens=2,
                       max_retries=0)  # fmt: skip
    message = model.invoke("cap me too")
    assert message.content == "the served "
    assert message.response_metadata["finish_reason"] == "length"


def test_response_format_with_a_cut_off_answer_is_a_length_finish(served: str) -> None:
    client = openai_client(served)
    question = [{"role": "user", "content": "json please"}]
    fmt = {"type": "json_object"}
    response = client.chat.completions.create(model="alpha", messages=question,
                                              response_format=fmt, max_tokens=2)  # fmt: skip
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == "the served "
    chunks = list(client.chat.completions.create(model="alpha", messages=question,
                                                 response_format=fmt, max_tokens=2,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "the served "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_history_from_model_dump_and_n_null(served: str) -> None:
    client = openai_client(served)
    first = client.chat.completions.create(model="alpha", messages=[{"role": "user",
                                           "content": "hi"}])  # fmt: skip
    history = [{"role": "user", "content": "hi"}, first.choices[0].message.model_dump(),
               {"role": "user", "content": "again"}]  # fmt: skip
    assert "audio" in history[1] and history[1]["audio"] is None  # as the SDK dumps it
    again = client.chat.completions.create(model="alpha", messages=history, n=None)
    assert again.choices[0].message.content == "the served answer"


def test_models_retrieve(served: str) -> None:
    import openai

    client = openai_client(served)
    assert client.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as route:
        client.completions.create(model="alpha", prompt="hi")
    assert "no route POST /v1/completions" in route.value.message


def test_draft_events_pass_a_plain_sdk_loop(served: str) -> None:
    """The `openai` SDK, streaming with drafts, a failing proposer among them: the common
    loop over `chunk.choices` reads the answer, and the drafts are there for who looks."""
    stream = openai_client(served).chat.completions.create(
        model="flaky", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"moa": {"drafts": True}},
    )  # fmt: skip
    text, drafts = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        if chunk.object == "moa.draft":
            drafts.append(chunk.to_dict())
    assert text == "the served answer"
    by_model = {d["model"]: d for d in drafts}
    assert by_model["p1"]["answer"] == "draft one" and by_model["p1"]["failure"] is None
    assert "scripted failure" in by_model["pbad"]["failure"]


def test_tool_call_message_has_null_content(served: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "multiply",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                },
            },
        }
    ]
    response = httpx.post(f"{served}/v1/chat/completions", json={
        "model": "tools", "messages": [{"role": "user", "content": "17 x 23"}], "tools": tools,
    }, timeout=30).json()  # fmt: skip
    message = response["choices"][0]["message"]
    assert message["tool_calls"] and message["content"] is None


def test_langserve_bad_input_is_a_400_without_traceback(served: str) -> None:
    response = httpx.post(f"{served}/moa/invoke", json={"input": []}, timeout=30)
    assert response.status_code == 400
    assert "empty conversation" in response.json()["detail"]
    # (the fixture checks the server's log for tracebacks when it stops)


def test_remote_runnable_and_curl(served: str) -> None:
    from langserve import RemoteRunnable

    assert RemoteRunnable(f"{served}/moa").invoke("hi").content == "the served answer"
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-s", f"{served}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out)["choices"][0]["message"]["content"] == "the served answer"


def test_a_client_that_hangs_up_stops_its_run(served: str, upstream: ScriptedOpenAIServer) -> None:
    """`slow` has a 1 s proposer: hang up during it, and the aggregator is never called."""
    for body in (
        {"model": "slow", "messages": [{"role": "user", "content": "hang up a"}]},
        {"model": "slow", "messages": [{"role": "user", "content": "hang up b"}], "stream": True},
    ):
        hang_up(served + "/v1/chat/completions", body)
        time.sleep(1.5)  # the proposer would have answered by now
        assert asked(upstream, body["messages"][0]["content"]) == ["slow"]  # no aggregator


def hang_up(url: str, body: dict, headers: dict | None = None) -> None:
    """Send, then leave after 0.4 s without waiting for the answer."""
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", url, json=body, headers=headers, timeout=0.4) as response:
            for _ in response.iter_bytes():
                pass


def asked(upstream: ScriptedOpenAIServer, question: str) -> list[str]:
    """The upstream models that received `question`, in order."""
    return [r.model for r in upstream.requests
            if r.messages and r.messages[-1].get("content") == question]  # fmt: skip


# ------------------------------------------------------------------- protection


@pytest.fixture(scope="module")
def guarded(upstream: ScriptedOpenAIServer, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("guarded")
    cfg = write_config(folder / "g.toml", upstream, "guarded", ["slow"], "aggpoison")
    base, process = start_moa_serve(
        cfg, env={"SCRIPTED_KEY": UPSTREAM_KEY, "MOA_SERVE_API_KEY": SERVE_KEY},
        args=["--max-body-bytes", "4000", "--max-batch", "3", "--max-runs", "1",
              "--max-queue", "1"],
    )  # fmt: skip
    yield base.removesuffix("/moa")
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert SERVE_KEY not in err


def test_every_route_needs_the_key(guarded: str) -> None:
    bearer = {"Authorization": f"Bearer {SERVE_KEY}"}
    for path in ("/", "/v1/models", "/moa/input_schema", "/docs"):
        refused = httpx.get(guarded + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(guarded + path, headers=bearer, timeout=10).status_code == 200, path
    wrong = httpx.get(guarded + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = base64.b64encode(f"me:{SERVE_KEY}".encode()).decode()
    page = httpx.get(guarded + "/", headers={"Authorization": f"Basic {basic}"}, timeout=10)
    assert page.status_code == 200 and "MoA inspector" in page.text
    assert openai_client(guarded, SERVE_KEY).models.list().data[0].id == "guarded"


def test_body_and_batch_limits(guarded: str) -> None:
    bearer = {"Authorization": f"Bearer {SERVE_KEY}"}
    big = {"model": "guarded", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(f"{guarded}/v1/chat/completions", json=big, headers=bearer)
    assert response.status_code == 413 and "over 4000 bytes" in response.json()["error"]["message"]
    response = httpx.post(f"{guarded}/moa/batch", json={"inputs": ["a", "b", "c", "d"]},
                          headers=bearer)  # fmt: skip
    assert response.status_code == 413
    assert response.json()["error"]["message"] == (
        "a batch of 4 inputs is over the limit of 3; split it"
    )


def test_batch_items_fail_one_by_one(guarded: str) -> None:
    bearer = {"Authorization": f"Bearer {SERVE_KEY}"}
    response = httpx.post(f"{guarded}/moa/batch", json={"inputs": ["fine", "poison"]},
                          headers=bearer, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    good, bad = response.json()["output"]
    assert good["content"] == "final answer"
    assert (
        bad["content"] == ""
        and "aggregator (aggpoison)" in (bad["response_metadata"]["moa_error"]["message"])
    )


def test_a_full_server_answers_429_with_retry_after(guarded: str) -> None:
    bearer = {"Authorization": f"Bearer {SERVE_KEY}"}
    body = {"model": "guarded", "messages": [{"role": "user", "content": "busy"}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=bearer, timeout=60) as client:
            return list(await asyncio.gather(*(
                client.post(f"{guarded}/v1/chat/completions", json=body) for _ in range(4)
            )))  # fmt: skip

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    assert statuses == [200, 200, 429, 429]  # 1 running + 1 queued, the rest refused
    refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_langserve_clients_that_hang_up_stop_their_run(
    guarded: str, upstream: ScriptedOpenAIServer
) -> None:
    bearer = {"Authorization": f"Bearer {SERVE_KEY}"}
    hang_up(f"{guarded}/moa/invoke", {"input": "hang up c"}, bearer)
    time.sleep(1.5)
    assert asked(upstream, "hang up c") == ["slow"]  # the aggregator was never called


def test_a_public_host_without_a_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[aggregator]\nprovider = "local"\n')
    env = {k: v for k, v in os.environ.items() if k != "MOA_SERVE_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "serve", "--config", str(cfg),
         "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "moa: error: refusing to serve on 0.0.0.0 without a key: set MOA_SERVE_API_KEY, or "
        "pass --allow-public to serve it to anyone who can reach this machine"
    )


# -------------------------------------------------------------------- inspector


class DevTools:
    """One page of a headless Chromium, driven over the DevTools protocol."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.ids = iter(range(1, 1_000_000))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while (reply := json.loads(self.socket.recv())).get("id") != ident:
            pass  # an event
        assert "error" not in reply, reply["error"]
        return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll `expression` until it is truthy; its last value when `timeout` runs out."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return value

    def open(self, url: str, before_load: str = "") -> None:
        if before_load:  # runs in the page before its own script
            self.call("Page.enable")
            self.call("Page.addScriptToEvaluateOnNewDocument", source=before_load)
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path, width: int = 1280) -> None:
        """The whole page as a PNG `width` CSS pixels wide."""
        height = self.evaluate("document.documentElement.scrollHeight")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    """A headless Chromium (no network of its own: it only reaches the local server)."""
    from websockets.sync.client import connect

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium here: apt-get install chromium")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-extensions", "--no-first-run",
         "--window-size=1280,900", f"--remote-debugging-port={port}",
         "--remote-allow-origins=*", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                assert time.monotonic() < deadline, "chromium never opened its DevTools port"
                time.sleep(0.2)
        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            yield DevTools(socket)
    finally:
        process.kill()
        process.wait(timeout=30)


PAGE_STATE = """(() => {
  const answer = document.querySelector('.answer');
  if (!answer || !answer.classList.contains('done')) return null;
  return {question: document.querySelector('.question').innerText,
          drafts: [...document.querySelectorAll('.draft')].map(d => d.innerText),
          layers: document.querySelectorAll('.layer').length,
          answer: answer.innerText,
          models: [...document.querySelectorAll('#model option')].map(o => o.value)};
})()"""


def test_inspector_page_in_a_real_browser(served: str, browser: DevTools) -> None:
    browser.open(f"{served}/?q=Why%20is%20the%20sky%20blue")
    state = browser.wait_for(PAGE_STATE)
    assert state, "the page never finished its answer"
    assert state["question"] == "Why is the sky blue"
    assert state["models"] == ["alpha", "tools", "broken", "slow", "flaky"]
    assert state["layers"] == 1 and len(state["drafts"]) == 2
    first, second = state["drafts"]  # in proposer order
    assert first.startswith("proposer 1 · p1 · ") and "tokens" in first and "draft one" in first
    assert second.startswith("proposer 2 · p2 · ") and "draft two" in second
    assert state["answer"] == "the served answer"


# Drafts a model could write: Markdown, and HTML that must be shown, never run.
INJECTION = (
    "Try <img src=x onerror=\"window.pwned.push('img')\"> and "
    "<script>window.pwned.push('script')</script> and "
    "[a trap](javascript:window.pwned.push('link')) but [the docs](https://example.com/a_b)."
)
SLOW_DRAFT = (
    "## Rayleigh scattering\n\nShort wavelengths scatter **much** more, roughly as "
    "*1/λ⁴*:\n\n1. blue light scatters most\n2. violet is absorbed high up\n   - and "
    "our eyes see less of it\n\n```python\nprint('<b>not bold</b>')\n```"
)
FAST_DRAFT = "**Short answer:** `scattering` makes it blue.\n\n- sunlight\n- air\n\n" + INJECTION
LONG_DRAFT = "The sky looks blue because air molecules scatter sunlight in every direction"
ANSWER = "### The answer\n\nThe sky is blue because of **Rayleigh scattering**.\n\n" + INJECTION


@pytest.fixture(scope="module")
def inspected(tmp_path_factory) -> Iterator[str]:
    """A served MoA for the inspector: 2 proposer layers of 3 proposers, proposer 1 slow,
    proposer 3 capped at 6 tokens; Markdown and HTML injections in the drafts and answer."""
    scripts = {
        "slowmd": ModelScript(reply=SLOW_DRAFT, latency=0.8),
        "fastmd": ModelScript(reply=FAST_DRAFT, latency=0.05),
        "capped": ModelScript(reply=LONG_DRAFT, latency=0.05),
        "aggmd": ModelScript(reply=ANSWER, token_delay=0.002),
    }
    with ScriptedOpenAIServer(scripts=scripts) as upstream:
        cfg = tmp_path_factory.mktemp("inspect") / "inspect.toml"
        proposers = "".join("[[proposers]]\n" + entry(upstream, p) for p in scripts if p != "aggmd")
        cfg.write_text(  # the last proposer (capped) gets max_tokens
            f'name = "inspect"\nlayers = 3\n{proposers}max_tokens = 6\n'
            f"[aggregator]\n{entry(upstream, 'aggmd')}"
        )
        base, process = start_moa_serve(cfg, env={"SCRIPTED_KEY": UPSTREAM_KEY})
        yield base.removesuffix("/moa")
        process.terminate()
        _, err = process.communicate(timeout=30)
        assert "Traceback" not in err, err


def test_models_carry_the_shape_of_each_moa(inspected: str) -> None:
    (card,) = httpx.get(f"{inspected}/v1/models", timeout=10).json()["data"]
    assert card["id"] == "inspect"
    assert card["moa"] == {"layers": 3, "proposers": ["slowmd", "fastmd", "capped"],
                           "aggregator": "aggmd"}  # fmt: skip


def test_draft_events_say_which_draft_hit_its_token_cap(inspected: str) -> None:
    body = {"model": "inspect", "messages": [{"role": "user", "content": "why blue?"}],
            "stream": True, "moa": {"drafts": True}}  # fmt: skip
    with httpx.stream("POST", f"{inspected}/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    finish = {(e["layer"], e["proposer"]): e["finish_reason"] for e in events
              if e.get("object") == "moa.draft"}  # fmt: skip
    assert finish == {(layer, p): "length" if p == 3 else "stop"
                      for layer in (1, 2) for p in (1, 2, 3)}  # fmt: skip


# Before the page's own script runs: a trap for injected code, and a log of the draft cards'
# states at every change of the page (to see the placeholders before the drafts).
RECORDER = """
window.pwned = [];
window.cardLog = [];
new MutationObserver(() => {
  const state = (c) => c.classList.contains('pending') ? 'wait' : 'done';
  const cards = [...document.querySelectorAll('.draft')].map(
    c => `${c.dataset.layer}.${c.dataset.proposer}:${state(c)}`
  ).join(' ');
  if (cards && cards !== window.cardLog[window.cardLog.length - 1]) window.cardLog.push(cards);
}).observe(document, {childList: true, subtree: true, attributes: true,
                      attributeFilter: ['class']});
"""

MARKDOWN_STATE = """(() => {
  const answer = document.querySelector('.answer');
  if (!answer || !answer.classList.contains('done')) return null;
  const turn = document.querySelector('.turn');
  const tags = (root, sel) => [...root.querySelectorAll(sel)].map(n => n.tagName.toLowerCase());
  const card = (d) => ({
    layer: d.dataset.layer, proposer: d.dataset.proposer, classes: [...d.classList],
    who: d.querySelector('.who').innerText, text: d.querySelector('.text').innerText,
    tags: tags(d.querySelector('.text'), '*'),
    links: [...d.querySelectorAll('.text a')].map(a => [a.innerText, a.getAttribute('href')]),
  });
  return {
    drafts: [...document.querySelectorAll('.draft')].map(card),
    answer: {who: document.querySelector('.answer-box .who').innerText, text: answer.innerText,
             tags: tags(answer, '*')},
    usage: document.querySelector('.turn .usage').innerText,
    injected: tags(turn, 'img, script, iframe, object, embed, [onerror], [onload]'),
    scriptLinks: [...turn.querySelectorAll('a')].filter(a => !/^https?:/.test(a.href)).length,
    pwned: window.pwned,
    cardLog: window.cardLog,
  };
})()"""


def test_inspector_renders_markdown_safely_in_proposer_order(
    inspected: str, browser: DevTools, tmp_path: Path
) -> None:
    browser.open(f"{inspected}/?model=inspect&q=Why%20is%20the%20sky%20blue", RECORDER)
    state = browser.wait_for(MARKDOWN_STATE)
    assert state, "the page never finished its answer"

    # nothing a model wrote ran or became an element; it is shown as text
    assert state["pwned"] == [] and state["injected"] == [] and state["scriptLinks"] == 0
    fast = state["drafts"][1]
    assert "<img src=x onerror=" in fast["text"] and "<script>window.pwned" in fast["text"]
    assert "[a trap](javascript:" in fast["text"]
    assert ["the docs", "https://example.com/a_b"] in fast["links"]
    assert "<script>" in state["answer"]["text"]

    # Markdown became elements
    assert ["p", "strong", "code", "ul", "li"] <= fast["tags"]
    slow = state["drafts"][0]
    for tag in ("h2", "strong", "em", "ol", "li", "ul", "pre", "code"):
        assert tag in slow["tags"], tag
    assert "print('<b>not bold</b>')" in slow["text"] and "b" not in slow["tags"]
    assert "**" not in slow["text"] and "##" not in slow["text"]
    assert ["h3", "p", "strong"] <= state["answer"]["tags"]

    # proposer order in each layer, though proposer 1 answered last
    assert [(d["layer"], d["proposer"]) for d in state["drafts"]] == [
        (layer, p) for layer in "12" for p in "123"
    ]
    assert [d["who"].split(" · ")[:2] for d in state["drafts"][:3]] == [
        ["proposer 1", "slowmd"], ["proposer 2", "fastmd"], ["proposer 3", "capped"]
    ]  # fmt: skip
    # placeholders for every proposer of both layers before any draft, and proposer 1's
    # still waiting when the others had come
    log = state["cardLog"]
    assert log[0] == "1.1:wait 1.2:wait 1.3:wait 2.1:wait 2.2:wait 2.3:wait", log
    assert "1.1:wait 1.2:done 1.3:done 2.1:wait 2.2:wait 2.3:wait" in log, log
    assert all("wait" not in d["who"] and "pending" not in d["classes"] for d in state["drafts"])

    # the capped draft is marked; the others not
    capped = [d for d in state["drafts"] if "capped" in d["classes"]]
    assert [d["proposer"] for d in capped] == ["3", "3"]
    assert all("cut at its token cap" in d["who"] for d in capped)
    assert sum("token cap" in d["who"] for d in state["drafts"]) == 2

    # the answer is labelled: aggregator model, latency, tokens; usage of every call
    who = state["answer"]["who"].split(" · ")
    assert who[:2] == ["aggregator", "aggmd"], who
    assert who[2].endswith(" s") and float(who[2][:-2]) > 0
    assert who[3].endswith(" tokens") and int(who[3].split()[0]) > 0
    total = int(state["usage"].split()[0])
    assert total > int(who[3].split()[0]) and state["usage"].endswith("tokens over every call")

    shot = Path(os.environ.get("MOA_INSPECTOR_SCREENSHOT") or tmp_path / "inspector.png")
    browser.screenshot(shot)  # MOA_INSPECTOR_SCREENSHOT=docs/images/inspector.png keeps it
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 10_000


# The page's Markdown renderer on its own: model text in, the elements it builds out.
MARKDOWN_CASES = {
    "[a](JAVASCRIPT:alert(1)) [b](data:text/html,x) [c](/relative) [d](HTTPS://example.com)":
        '<p>[a](JAVASCRIPT:alert(1)) [b](data:text/html,x) [c](/relative) <a href="https://'
        'example.com/" rel="noopener noreferrer nofollow" target="_blank">d</a></p>',
    "<svg onload=alert(1)> &amp; <!-- x -->":
        "<p>&lt;svg onload=alert(1)&gt; &amp;amp; &lt;!-- x --&gt;</p>",
    "```js\n<script>x()</script>":  # unclosed, as while streaming
        '<pre><code data-lang="js">&lt;script&gt;x()&lt;/script&gt;</code></pre>',
    "snake_case_name, _it_ and *a **b** c* and \\*not\\*":
        "<p>snake_case_name, <em>it</em> and <em>a <strong>b</strong> c</em> and *not*</p>",
    "`a <b> **c**`": "<p><code>a &lt;b&gt; **c**</code></p>",
    "# T\n\n> quote **b**\n\n---": "<h1>T</h1><blockquote><p>quote <strong>b</strong></p>"
                                   "</blockquote><hr>",
    "3. three\n4. four\n   - nested": '<ol start="3"><li>three</li><li>four<ul><li>nested</li>'
                                      "</ul></li></ol>",
}  # fmt: skip


def test_inspector_markdown_renderer(served: str, browser: DevTools) -> None:
    browser.open(f"{served}/")
    assert browser.wait_for("document.querySelectorAll('#model option').length")
    rendered = browser.evaluate(
        "(cases => cases.map(text => { const box = document.createElement('div');"
        f" markdown(text, box); return box.innerHTML; }}))({json.dumps(list(MARKDOWN_CASES))})"
    )
    assert dict(zip(MARKDOWN_CASES, rendered, strict=True)) == MARKDOWN_CASES

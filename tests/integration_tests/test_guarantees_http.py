"""The call layer's guarantees over real HTTP, on every face, as users meet them.

- A provider that quotes the caller's key back in its 401 (as OpenAI does) must never get
  that key into an exception (str, repr, the traceback Python prints), metadata, an output
  or errors file, CLI output (every flag combination) or the `moa serve` log. Every key
  shape seen in the wild is tried, including one no pattern matches (removed by value).
- A hung proposer with a timeout must not hold the process: the CLI and a plain script
  exit soon after the answer, and abandoned calls end instead of piling up threads.
- An empty ``choices`` list is a one-line error naming the aggregator.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from langchain_moa import ChatMoA, MoAError, MoAJudge, build_judge_graph, build_moa_graph
from langchain_moa.calls import CallError
from langchain_moa.data import RunStopped, agenerate
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, start_moa_serve
from tests.support import call

pytestmark = pytest.mark.http

_rng = random.Random(20261123)


def _chars(alphabet: str, n: int) -> str:
    return "".join(_rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
KEYS = {
    "openai-project": "sk-proj-" + _chars(ALNUM + "_-", 48),
    "anthropic": "sk-ant-api03-" + _chars(ALNUM + "_-", 60),
    "groq": "gsk_" + _chars(ALNUM, 52),
    "together": "tgp_v1_" + _chars(ALNUM + "_-", 43),
    "google": "AIza" + _chars(ALNUM + "_-", 35),
    "huggingface": "hf_" + _chars(ALNUM, 34),
    "plain-hex": _chars("0123456789abcdef", 40),
    "no-known-shape": "Qx" + _chars(ALNUM, 30),  # only removal by value catches this one
}


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="draft one"),
        "p2": ModelScript(reply="draft two"),
        "agg": ModelScript(reply="the final answer"),
        "reject": ModelScript(reject_key=True),
        "hang": ModelScript(reply="too late", latency=60),
        "nochoices": ModelScript(no_choices=True),
        "judge": ModelScript(reply="A is better. [[A]]"),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        yield srv


def client(server: ScriptedOpenAIServer, model: str, key: str = "sk-scripted-test") -> ChatOpenAI:
    return ChatOpenAI(model=model, api_key=key, base_url=server.base_url, max_retries=0)


def assert_no_key(exc: BaseException, key: str) -> None:
    """Not in str, repr, nor anywhere in the traceback Python would print (causes too)."""
    printed = "".join(traceback.format_exception(exc))
    for text in (str(exc), repr(exc), printed):
        assert key not in text, text
    assert "***" in str(exc)  # the provider did quote the key: it was masked, not lost


# ------------------------------------------------------------------- secrets, API


@pytest.mark.parametrize("shape", list(KEYS))
@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
async def test_chat_moa_aggregator_401_never_shows_the_key(
    server: ScriptedOpenAIServer, shape: str, how: str
) -> None:
    key = KEYS[shape]
    moa = ChatMoA(proposers=[client(server, "p1")], aggregator=client(server, "reject", key))
    with pytest.raises(CallError) as info:
        await call(moa, "What is MoA?", how)
    assert re.match(
        r"aggregator \(reject\): \w*AuthenticationError: Error code: 401", str(info.value)
    )
    assert info.value.status_code == 401 and not info.value.transient
    assert_no_key(info.value, key)


@pytest.mark.parametrize("shape", list(KEYS))
def test_proposer_401_never_reaches_metadata_or_quorum_errors(
    server: ScriptedOpenAIServer, shape: str
) -> None:
    key = KEYS[shape]
    proposers = [client(server, "reject", key), client(server, "p2")]
    answer = ChatMoA(proposers=proposers, aggregator=client(server, "agg")).invoke("q")
    recorded = json.dumps(answer.response_metadata["moa"])
    assert key not in recorded
    assert "Incorrect API key provided: ***" in recorded
    strict = ChatMoA(proposers=proposers, aggregator=client(server, "agg"), min_proposers=2)
    with pytest.raises(MoAError) as info:
        strict.invoke("q")
    assert re.search(r"proposer 1 \(reject\): \w*AuthenticationError", str(info.value))
    assert_no_key(info.value, key)


@pytest.mark.parametrize("shape", ["no-known-shape", "plain-hex", "groq"])
@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
async def test_graph_judge_and_judge_graph_never_show_the_key(
    server: ScriptedOpenAIServer, shape: str, how: str
) -> None:
    key = KEYS[shape]
    rejecting = client(server, "reject", key)
    graph = build_moa_graph([client(server, "p1")], rejecting)
    with pytest.raises(CallError) as info:
        await call(graph, {"messages": [HumanMessage("q")]}, how)
    assert str(info.value).startswith("aggregator (reject):")
    assert_no_key(info.value, key)

    judge = MoAJudge(judges=[rejecting])
    with pytest.raises(MoAError) as info:
        if how == "invoke":
            judge.rank("q", ["a", "b"])
        else:
            await judge.arank("q", ["a", "b"])
    assert re.search(r"\w*AuthenticationError", str(info.value))  # the reason is listed
    assert_no_key(info.value, key)

    # the sampler's model is not known to the judge: the call layer learns its key itself
    graph = build_judge_graph(MoAJudge(judges=[client(server, "judge")]), rejecting, n=2)
    with pytest.raises(CallError) as info:
        await call(graph, {"prompt": "q"}, how)
    assert str(info.value).startswith("sample 1 (reject):")
    assert_no_key(info.value, key)


async def test_pipeline_errors_file_never_shows_the_key(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    key = KEYS["no-known-shape"]
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "q1"}\n{"id": "b", "prompt": "q2"}\n')
    moa = ChatMoA(proposers=[client(server, "p1")], aggregator=client(server, "reject", key))
    with pytest.raises(RunStopped) as info:  # a rejected key stops the run after one row
        await agenerate(source, tmp_path / "out.jsonl", moa)
    assert (info.value.summary.failed, info.value.summary.not_attempted) == (1, 1)
    assert key not in str(info.value)
    text = (tmp_path / "out.jsonl.errors.jsonl").read_text()
    assert key not in text
    assert re.search(r"aggregator \(reject\): \w*AuthenticationError", text)
    assert all(json.loads(line)["reason"].count("\n") == 0 for line in text.splitlines())


async def test_empty_choices_is_a_one_line_error_naming_the_aggregator(
    server: ScriptedOpenAIServer,
) -> None:
    moa = ChatMoA(proposers=[client(server, "p1")], aggregator=client(server, "nochoices"))
    for how in ("invoke", "ainvoke"):
        with pytest.raises(CallError) as info:
            await call(moa, "q", how)
        assert str(info.value).startswith("aggregator (nochoices): the model returned no answer")
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------- secrets, CLI

ENV_NAME = "ACME_ACCESS"  # not named like a credential: only the config says it is one


def write_config(
    tmp_path: Path, server: ScriptedOpenAIServer, proposers: list[str], agg: str, extra: str = ""
) -> Path:
    entry = f'model = "{{}}"\nbase_url = "{server.base_url}"\napi_key_env = "{ENV_NAME}"\n'
    text = f"layers = 2\n{extra}" + "".join("[[proposers]]\n" + entry.format(p) for p in proposers)
    text += "[aggregator]\n" + entry.format(agg)
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def moa(
    *args: str, key: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, ENV_NAME: key},
    )


FLAG_SETS = [
    [],
    ["--json"],
    ["--show-proposals"],
    ["--verbose"],
    ["--json", "--show-proposals"],
    ["--debug"],
]


@pytest.mark.parametrize("shape", ["no-known-shape", "plain-hex"])
def test_cli_never_prints_the_key(server: ScriptedOpenAIServer, tmp_path: Path, shape: str) -> None:
    key = KEYS[shape]
    failing_aggregator = write_config(tmp_path, server, ["p1", "p2"], "reject")
    for flags in FLAG_SETS:
        result = moa("chat", "--config", str(failing_aggregator), *flags, "q", key=key)
        assert result.returncode == 1, (flags, result.stderr)
        assert key not in result.stdout + result.stderr, flags
        assert re.search(r"aggregator \(reject\): \w*AuthenticationError", result.stderr), flags
    interactive = moa("chat", "--config", str(failing_aggregator), key=key, stdin="q1\n")
    assert key not in interactive.stdout + interactive.stderr
    # a proposer quoting the key: --show-proposals prints its error line, masked
    failing_proposer = write_config(tmp_path, server, ["reject", "p2"], "agg")
    result = moa("chat", "--config", str(failing_proposer), "--show-proposals", "q", key=key)
    assert result.returncode == 0, result.stderr
    assert "proposer 1 (reject) [layer 1] failed:" in result.stdout and key not in result.stdout
    result = moa("chat", "--config", str(failing_proposer), "--json", "q", key=key)
    assert key not in result.stdout and "***" in result.stdout


def test_generate_never_writes_the_key(server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    key = KEYS["no-known-shape"]
    cfg = write_config(tmp_path, server, ["p1"], "reject")
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "q"}\n')
    result = moa(
        "generate", str(source), str(tmp_path / "out.jsonl"), "--config", str(cfg), key=key
    )
    assert result.returncode == 1
    errors = (tmp_path / "out.jsonl.errors.jsonl").read_text()
    assert key not in result.stdout + result.stderr + errors and "***" in errors


def test_serve_log_never_shows_the_key(server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    pytest.importorskip("langserve")
    key = KEYS["no-known-shape"]
    cfg = write_config(tmp_path, server, ["p1"], "reject")
    base, process = start_moa_serve(cfg, env={ENV_NAME: key})
    try:
        response = httpx.post(f"{base}/invoke", json={"input": "q"}, timeout=30)
        assert response.status_code == 502 and key not in response.text
        assert "aggregator (reject)" in response.text  # names the failing model
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert "aggregator (reject)" in err  # the failure was logged...
    assert key not in out + err  # ...without the key


# --------------------------------------------------------------- hung proposers


SCRIPT = """
import sys, time
from langchain_openai import ChatOpenAI
from langchain_moa import ChatMoA
url = sys.argv[1]
def client(name):
    return ChatOpenAI(model=name, api_key="sk-scripted-test", base_url=url)
proposers = [client("hang"), client("p1")]
moa = ChatMoA(proposers=proposers, aggregator=client("agg"), proposer_timeout=1)
started = time.perf_counter()
print(moa.invoke("q").content, round(time.perf_counter() - started, 2), flush=True)
"""


def test_a_hung_proposer_does_not_hold_a_script_or_the_cli(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.base_url], capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    answer, seconds = result.stdout.split()[:-1], float(result.stdout.split()[-1])
    assert " ".join(answer) == "the final answer" and seconds < 5
    assert elapsed < seconds + 15  # before: the process lived until the hung call ended (60 s)

    cfg = write_config(tmp_path, server, ["hang", "p1"], "agg", extra="proposer_timeout = 1\n")
    started = time.perf_counter()
    result = moa("chat", "--config", str(cfg), "q", key="sk-scripted-test", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "the final answer"
    assert time.perf_counter() - started < 20


def test_abandoned_sync_calls_end_instead_of_piling_up(server: ScriptedOpenAIServer) -> None:
    moa = ChatMoA(
        proposers=[client(server, "hang"), client(server, "p1")],
        aggregator=client(server, "agg"),
        proposer_timeout=0.5,
    )
    moa.invoke("warm up")

    def workers() -> list[threading.Thread]:  # the call layer's threads (not the server's)
        return [t for t in threading.enumerate() if t.name.startswith("moa proposer")]

    for _ in range(20):
        meta = moa.invoke("q").response_metadata["moa"]
        assert meta["layers"][0]["proposals"][0]["error"].startswith("TimeoutError")
    assert all(t.daemon for t in workers())  # never holding the process
    # the budget went down as the client's request timeout: each abandoned call ends soon
    deadline = time.monotonic() + 20
    while workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers() == []
    requests = server.requests_for("hang")
    assert requests and all(r.body.get("timeout") is None for r in requests)  # not in the body

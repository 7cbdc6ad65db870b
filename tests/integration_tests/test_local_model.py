"""The real embedded model: SmolLM2-135M through the in-process llama.cpp server.

These tests talk HTTP to a real model on 127.0.0.1 through ChatOpenAI, exactly like a
remote provider, and drive the `moa` CLI as a user would (subprocess, stdin, exit codes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from langchain_moa import ChatMoA
from langchain_moa.local import local_chat_model, local_server, pull_bundled_model

pytestmark = pytest.mark.local_model

SHORT_MEMBERS = {  # (temperature, seed, max_tokens)
    "proposers": [(0.7, 1, 24), (0.9, 2, 24), (1.1, 3, 24)],
    "aggregator": (0.2, 4, 32),
}


@pytest.fixture(scope="module")
def model_path() -> Path:
    return pull_bundled_model()


@pytest.fixture(scope="module")
def short_config(tmp_path_factory, model_path: Path, local_recipe) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "short.toml"
    path.write_text(local_recipe(**SHORT_MEMBERS))
    return path


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def small_moa() -> ChatMoA:
    proposers = [
        local_chat_model(temperature=t, seed=s, max_tokens=24)
        for t, s in ((0.7, 1), (0.9, 2), (1.1, 3))
    ]
    return ChatMoA(proposers=proposers, aggregator=local_chat_model(temperature=0.2, max_tokens=32))


def test_three_proposer_local_moa_answers(model_path: Path) -> None:
    moa = small_moa()
    started = time.perf_counter()
    message = moa.invoke([HumanMessage("What is the capital of France?")])
    wall = time.perf_counter() - started
    assert isinstance(message.content, str) and message.content.strip()
    proposals = message.response_metadata["moa"]["layers"][0]["proposals"]
    assert len(proposals) == 3
    assert all(p["error"] is None and p["answer"] for p in proposals)
    assert message.usage_metadata["total_tokens"] > 0
    assert message.usage_metadata["output_tokens"] >= sum(
        p["usage"]["output_tokens"] for p in proposals
    )
    # the three drafts were decoded in parallel slots, not one after another
    drafts = [p["latency_s"] for p in proposals]
    aggregator = message.response_metadata["moa"]["aggregator"]["latency_s"]
    assert wall < sum(drafts) + aggregator - 0.5 * min(drafts)


async def test_local_moa_streams_and_runs_async(model_path: Path) -> None:
    moa = small_moa()
    chunks = [c async for c in moa.astream("Name a colour.")]
    assert sum(1 for c in chunks if c.content) >= 2  # real token stream, not one blob
    merged = sum(chunks[1:], chunks[0])
    assert merged.content.strip()
    assert len(merged.response_metadata["moa"]["layers"][0]["proposals"]) == 3


def test_server_is_started_once_and_restarts_after_stop(model_path: Path) -> None:
    first = local_server()
    assert local_server() is first and first.running
    url = first.base_url
    first.stop()
    assert not first.running
    again = local_server()
    assert again.running and again.base_url.startswith("http://127.0.0.1:")
    answer = local_chat_model(max_tokens=8).invoke("Hi").content
    assert isinstance(answer, str) and answer.strip()
    assert url.startswith("http://127.0.0.1:")


def test_cli_show_proposals_prints_three_drafts(short_config: Path) -> None:
    result = run_cli("chat", "--config", str(short_config), "--show-proposals", "Say hello.")
    assert result.returncode == 0, result.stderr
    for i in (1, 2, 3):
        assert f"proposer {i} (smollm2-135m-instruct) [layer 1]:" in result.stdout
    assert "answer:" in result.stdout
    assert "Traceback" not in result.stderr


def test_cli_interactive_keeps_history(short_config: Path) -> None:
    result = run_cli(
        "chat", "--config", str(short_config), "--json",
        stdin="My name is Ada.\nWhat is my name?\nexit\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [t["turn"] for t in turns] == [1, 2]
    # the second request carries question 1, answer 1 and question 2
    assert turns[0]["messages_sent"] == 1 and turns[1]["messages_sent"] == 3


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("chat", "--recipe", "no-such-recipe", "q"), "unknown recipe"),
        (("chat", "--config", "/nonexistent/moa.toml", "q"), "does not exist"),
        (("chat", "--recipe", "together-moa", "q"), "TOGETHER_API_KEY"),
    ],
)
def test_cli_user_errors(args, fragment, tmp_path: Path) -> None:
    env = {"TOGETHER_API_KEY": ""}
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_bad_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: 2\nproposers: [{model: a}]\naggregator: {model: b, base_url: x}\n")
    result = run_cli("chat", "--config", str(bad), "q")
    assert result.returncode != 0
    assert "proposer 1: base_url: missing" in result.stderr
    assert "Traceback" not in result.stderr


HANG_AFTER_TIMEOUT = """
from langchain_moa import ChatMoA, MoAError
moa = ChatMoA.from_recipe("local", proposer_timeout=0.5)
try:
    moa.invoke("Explain hash tables in detail, with examples.")
except MoAError as exc:
    print("MoAError:", str(exc)[:60])
"""

STILL_RUNNING_AT_EXIT = """
import threading, time
from langchain_moa.local import local_chat_model
model = local_chat_model(max_tokens=200, timeout=600)
threading.Thread(target=model.invoke, args=("Write a long story.",), daemon=True).start()
time.sleep(1.0)  # the request is on the server now; exit waits for its answer to end
print("stopped")
"""


@pytest.mark.parametrize(
    ("script", "printed"),
    [(HANG_AFTER_TIMEOUT, "MoAError: only 0 of 3"), (STILL_RUNNING_AT_EXIT, "stopped")],
    ids=["after-a-proposer-timeout", "request-still-running"],
)
def test_the_process_exits_while_a_local_request_is_abandoned(script, printed, model_path) -> None:
    """A timed-out call's daemon thread never keeps the process alive, embedded model included.

    The llama.cpp server's destructor joins its threads holding the GIL: with a request
    still in flight on another thread, that used to hang the interpreter's exit forever.
    """
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert printed in result.stdout
    assert time.perf_counter() - started < 60

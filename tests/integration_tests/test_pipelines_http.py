"""Both pipelines over real HTTP, including a run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer

pytestmark = pytest.mark.http


def prefers_longer(body: dict) -> str:
    text = body["messages"][-1]["content"]
    if "[Answer A]" not in text:
        return "plain answer"
    a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = text.split("[Answer B]\n")[1]
    return "Longer is better here. [[A]]" if len(a) > len(b) else "B says more. [[B]]"


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="draft one", latency=0.2),
        "p2": ModelScript(reply="draft two", latency=0.2),
        "agg": ModelScript(reply=lambda body: "final: " + body["messages"][-1]["content"]),
        "j1": ModelScript(reply=prefers_longer),
        "j2": ModelScript(reply=prefers_longer),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        yield srv


def config(tmp_path: Path, server: ScriptedOpenAIServer, proposers: list[str], agg: str) -> Path:
    entry = 'model = "{}"\nbase_url = "{}"\napi_key_env = "SCRIPTED_KEY"\n'
    text = "layers = 2\n" + "".join(
        "[[proposers]]\n" + entry.format(p, server.base_url) for p in proposers
    )
    text += "[aggregator]\n" + entry.format(agg, server.base_url)
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def moa_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCRIPTED_KEY": "sk-scripted-test"},
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_killed_midway_resumes_with_every_row_once(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1", "p2"], "agg")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(24)))
    out = tmp_path / "out.jsonl"

    first = moa_cli("generate", str(source), str(out), "--config", str(cfg), "--concurrency", "2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = out.read_text().count("\n")
    assert 4 <= done_before < 24  # killed mid-way

    second = moa_cli("generate", str(source), str(out), "--config", str(cfg), "--concurrency", "4")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "already done" in err
    result = rows(out)
    ids = [r["id"] for r in result]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(1, 25))
    assert len(ids) == len(set(ids)) == 24
    for r in result:
        assert r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-1]["content"].startswith("final: ")


def test_label_over_http_with_an_moa_judge(tmp_path: Path, server: ScriptedOpenAIServer) -> None:
    cfg = config(tmp_path, server, ["j1", "j2"], "j1")
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "t", "prompt": "Why is the sky blue?",
                    "responses": ["Rayleigh.", "Rayleigh scattering of sunlight.", "Magic"]})
        + "\n"
    )  # fmt: skip
    out = tmp_path / "dpo.jsonl"
    proc = moa_cli("label", str(source), str(out), "--config", str(cfg))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (row,) = rows(out)
    assert row["chosen"] == "Rayleigh scattering of sunlight."
    assert row["rejected"] == "Magic"
    # 3 pairs x 2 orders x 2 judges, then 6 aggregator calls with the verdicts injected
    assert len(row["judge"]["verdicts"]) == 12
    assert len(row["judge"]["aggregator_verdicts"]) == 6
    assert server.requests_for("j2")  # both judges were asked

"""`moa generate` as users run it, against the scripted OpenAI-compatible server: Ctrl-C
mid-run reports what was written, exits 130, and a rerun finishes the rest exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer
from tests.support import interruptible

pytestmark = pytest.mark.http

ROWS = 4


@pytest.fixture
def slow_config(tmp_path: Path):
    """A 1-layer MoA whose aggregator takes 1.5 s per answer (rows stay in flight)."""
    scripts = {"agg": ModelScript(reply="answer", latency=1.5)}
    with ScriptedOpenAIServer(scripts) as server:
        path = tmp_path / "slow.toml"
        path.write_text(
            f'name = "slow"\nlayers = 1\n[aggregator]\nmodel = "agg"\n'
            f'base_url = "{server.base_url}"\n'
        )
        yield path


def generate(config: Path, inp: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", "generate", str(inp), str(out),
         "--config", str(config), "--concurrency", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=interruptible,
    )  # fmt: skip


def rows_in(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]  # whole lines only


def test_ctrl_c_reports_the_rows_written_and_a_rerun_finishes_the_rest(
    slow_config: Path, tmp_path: Path
) -> None:
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "sft.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(ROWS)))
    run = generate(slow_config, inp, out)
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text():  # the first row is written
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no row was written"
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)  # the second row is in flight (1.5 s each)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    written = rows_in(out)
    assert 1 <= len(written) < ROWS
    assert all(row["messages"][-1]["content"] == "answer" for row in written)
    lines = stderr.splitlines()
    assert lines[-2] == (
        f"read {ROWS} rows: {len(written)} written, 0 failed, {ROWS - len(written)} not done "
        f"(interrupted; run again to finish them) -> {out}"
    )
    assert lines[-1] == "moa: interrupted; run the same command again to finish"
    assert "Traceback" not in stderr and "100%" not in stderr

    rerun = generate(slow_config, inp, out)
    _, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stderr
    ids = [row["id"] for row in rows_in(out)]
    assert len(ids) == ROWS and len(set(ids)) == ROWS  # every row once
    assert f"{len(written)} already done, {ROWS - len(written)} written" in stderr

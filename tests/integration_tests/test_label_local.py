"""A labeling run on the real embedded model (SmolLM2-135M judges, llama.cpp grammar)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from langchain_moa.local import pull_bundled_model

pytestmark = pytest.mark.local_model

LOCAL_MEMBERS = {"proposers": [(0.3, 1, 120), (0.5, 2, 120)], "aggregator": (0.2, 3, 120)}


def test_moa_label_on_the_local_model(tmp_path: Path, local_recipe) -> None:
    pull_bundled_model()
    cfg = tmp_path / "local.toml"
    cfg.write_text(local_recipe(**LOCAL_MEMBERS))
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "capital", "prompt": "What is the capital of France?",
                    "responses": ["Paris is the capital of France.", "Berlin."]}) + "\n"
        + json.dumps({"id": "sum", "prompt": "What is 3 + 4?",
                      "responses": ["3 + 4 = 7.", "It is 12.", "7"]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "dpo.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "label", str(source), str(out),
         "--config", str(cfg)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert "Traceback" not in result.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    errors_file = out.with_name(out.name + ".errors.jsonl")
    failed = [json.loads(line) for line in errors_file.read_text().splitlines()]
    # every row is accounted for, exactly once, and the exit code says whether any failed
    assert sorted([r["id"] for r in written] + [f["id"] for f in failed]) == ["capital", "sum"]
    assert result.returncode == (1 if failed else 0)
    assert written, f"no row labeled: {failed}"
    for row in written:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and {chosen, rejected} <= set(row["candidates"])
        details = row["judge"]
        # the grammar makes the tiny model's verdicts parseable
        assert details["abstentions"] == 0
        assert all(v["verdict"] in ("A", "B", "C") for v in details["verdicts"])
        assert details["aggregator_verdicts"]


PAIRS = Path(__file__).parents[2] / "benchmarks" / "data" / "judge_pairs.jsonl"


def test_likelihood_judge_tells_right_from_wrong_on_the_shipped_set() -> None:
    """The claim docs/judge.md makes: the embedded judge's token probabilities pick the
    right answer of a right/wrong pair (88 % measured; greedy, so it repeats)."""
    from langchain_moa import MoAJudge
    from langchain_moa.local import local_chat_model

    pull_bundled_model()
    judge = MoAJudge([local_chat_model()], mode="likelihood", grammar=True)
    # every 4th pair keeps the test short; benchmarks/bench_judge_scoring.py runs all 60
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()][::4]
    right = 0
    for pair in pairs:
        result = judge.rank(pair["prompt"], [pair["wrong"], pair["right"]])
        assert result.details["abstentions"] == 0
        right += result.chosen == 1 and result.scores[1] > result.scores[0]
    assert right / len(pairs) >= 0.8, f"{right} of {len(pairs)}"


def test_moa_label_on_the_local_recipe_prefers_the_right_answer(tmp_path: Path) -> None:
    pull_bundled_model()
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "sum", "prompt": "What is 2+2?",
                    "responses": ["2+2 = 5.", "2+2 = 4.", "2+2 = 22."]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "dpo.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "label", str(source), str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert row["chosen"][-1]["content"] == "2+2 = 4."
    # the recipe's three judges are one model in three seeds: each candidate asked once
    assert row["judge"]["mode"] == "likelihood" and len(row["judge"]["verdicts"]) == 3

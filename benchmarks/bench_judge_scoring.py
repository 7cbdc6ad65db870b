"""Does the embedded judge tell a right answer from a wrong one? Verdict vs probabilities.

The labelled set (``benchmarks/data/judge_pairs.jsonl``, shipped with the project) holds 60
prompts, each with a clearly right and a clearly wrong answer: single-step arithmetic,
capital cities, and a correct statement against the same statement with one fact changed.

Three scorings of the embedded SmolLM2-135M (grammar-constrained, as the ``local`` recipe
runs it):

- ``verdict``: the written rating / verdict, the argmax (``scoring="verdict"``);
- ``probability``: the token probabilities at the verdict (``scoring="probability"``): the
  expected rating (pointwise), P(first answer wins) (pairwise). Each judge call is made once
  and scored both ways, so these two see exactly the same generations;
- ``likelihood``: ``mode="likelihood"``, the judge's mean log-probability per token of
  writing each answer (the ``local`` recipe's default for ``moa label``).

Accuracy per pair: 1 when the right answer scores higher, 0.5 on a tie, 0 otherwise (a
judge that rates everything alike scores 50 %). Pairwise judging presents both orders
(position bias cancels). One judge (seed 1): the recipe's three seeds of one model differ
only in sampling.

Run: ``python benchmarks/bench_judge_scoring.py`` (writes benchmarks/results/judge_scoring.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from _common import HERE, RESULTS, write_results

DATA = HERE / "data" / "judge_pairs.jsonl"


def load_pairs(limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return rows[:limit] if limit else rows


def accuracy(right: float | None, wrong: float | None) -> float:
    if right is None or wrong is None:
        return 0.5
    return 1.0 if right > wrong else 0.5 if right == wrong else 0.0


def rescore(details: dict[str, Any], mode: str, use_probability: bool) -> list[float | None]:
    """Candidate scores [right, wrong] from one rank's recorded verdicts, one way or the other."""
    points: list[list[float]] = [[], []]
    if mode == "pointwise":
        for v in details["verdicts"]:
            if v["verdict"] is None:
                continue
            value = v["probability_score"] if use_probability else v["verdict"]
            value = v["verdict"] if value is None else value
            points[v["key"]["candidate"]].append(float(value))
    else:
        votes: dict[tuple, list[float]] = {}
        for v in details["verdicts"]:
            if v["verdict"] is None:
                continue
            first = {"A": 1.0, "B": 0.0, "C": 0.5}[v["verdict"]]
            if use_probability and v["probability_score"] is not None:
                first = v["probability_score"]
            # both orders of the one pair (0, 1): "swapped" means candidate 1 was shown first
            for_zero = 1.0 - first if v["key"]["swapped"] else first
            votes.setdefault((v["judge"],), []).append(for_zero)
        for per_order in votes.values():
            vote = sum(per_order) / len(per_order)
            points[0].append(vote)
            points[1].append(1.0 - vote)
    return [sum(p) / len(p) if p else None for p in points]


def _summary(mode: str, rows: list[dict[str, Any]], per_kind: dict, seconds: float) -> dict:
    names = list(rows[0]["scores"])
    return {
        "mode": mode,
        "pairs": len(rows),
        "seconds": round(seconds, 1),
        "accuracy": {
            n: round(sum(accuracy(*r["scores"][n]) for r in rows) / len(rows), 3) for n in names
        },
        "ties": {n: sum(r["scores"][n][0] == r["scores"][n][1] for r in rows) for n in names},
        "by_kind": {
            kind: {n: round(sum(v) / len(v), 3) for n, v in scores.items()}
            for kind, scores in per_kind.items()
        },
        "rows": rows,
    }


def run(mode: str, limit: int | None) -> dict[str, Any]:
    from langchain_moa import MoAJudge
    from langchain_moa.local import local_chat_model

    model = local_chat_model(temperature=0.2, seed=1, max_tokens=128)
    if mode == "likelihood":
        judge = MoAJudge([model], mode="likelihood", grammar=True)
    else:
        judge = MoAJudge([model], mode=mode, grammar=True, scoring="probability")  # type: ignore[arg-type]
    per_kind: dict[str, dict[str, list[float]]] = {}
    rows = []
    started = time.perf_counter()
    for pair in load_pairs(limit):
        result = judge.rank(pair["prompt"], [pair["right"], pair["wrong"]])
        if mode == "likelihood":
            scores = {"likelihood": list(result.scores)}
        else:
            scores = {
                "verdict": rescore(result.details, mode, use_probability=False),
                "probability": rescore(result.details, mode, use_probability=True),
            }
        for name, pair_scores in scores.items():
            per_kind.setdefault(pair["kind"], {}).setdefault(name, []).append(
                accuracy(*pair_scores)
            )
        rows.append({"id": pair["id"], "scores": scores,
                     "fallbacks": result.details["probability_fallbacks"]})  # fmt: skip
        print(f"{mode} {pair['id']}: {scores}", flush=True)
    return _summary(mode, rows, per_kind, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--modes", default="likelihood,pointwise,pairwise")
    args = parser.parse_args()
    runs = {mode: run(mode, args.limit) for mode in args.modes.split(",")}
    stored = RESULTS / "judge_scoring.json"
    if stored.exists():  # keep the modes not rerun this time
        earlier = json.loads(stored.read_text())["runs"]
        runs = {**{r["mode"]: r for r in earlier}, **runs}
    results = {
        "set": str(DATA.relative_to(HERE.parent)),
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "runs": list(runs.values()),
    }
    write_results("judge_scoring.json", results, indent=1)
    for r in results["runs"]:
        print(f"{r['mode']}: accuracy {r['accuracy']} ties {r['ties']} ({r['seconds']} s)")


if __name__ == "__main__":
    main()

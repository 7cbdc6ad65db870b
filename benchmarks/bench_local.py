"""The embedded local model: cold start and warm answers, MoA vs one call of the same model.

- cold: a fresh process that imports the package, starts the in-process llama.cpp server,
  loads SmolLM2-135M and answers (``local`` recipe: 3 proposers + aggregator), wall time from
  process start to the answer; the same for one plain call.
- warm: in one process after a warm-up, the median over repeats of a local 3-proposer MoA
  answer and of one call of the same model (the aggregator's settings).

Run: ``python benchmarks/bench_local.py`` (writes benchmarks/results/local.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTION = "Give me two tips for sleeping better."

COLD_MOA = f"""
from langchain_moa import ChatMoA
m = ChatMoA.from_recipe("local")
r = m.invoke({QUESTION!r})
print(r.usage_metadata["output_tokens"])
"""
COLD_SINGLE = f"""
from langchain_moa.local import local_chat_model
r = local_chat_model(temperature=0.3, seed=7, max_tokens=200).invoke({QUESTION!r})
print(r.usage_metadata["output_tokens"])
"""


def cold(script: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from langchain_moa import ChatMoA
    from langchain_moa.local import local_chat_model, pull_bundled_model

    pull_bundled_model()
    cold_moa = [cold(COLD_MOA) for _ in range(args.repeats)]
    cold_single = [cold(COLD_SINGLE) for _ in range(args.repeats)]

    moa = ChatMoA.from_recipe("local")
    single = local_chat_model(temperature=0.3, seed=7, max_tokens=200)
    moa.invoke(QUESTION)
    single.invoke(QUESTION)
    warm_moa, warm_single, moa_tokens, single_tokens = [], [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        message = moa.invoke(QUESTION)
        warm_moa.append(time.perf_counter() - started)
        moa_tokens.append(message.usage_metadata["output_tokens"])
        started = time.perf_counter()
        message = single.invoke(QUESTION)
        warm_single.append(time.perf_counter() - started)
        single_tokens.append(message.usage_metadata["output_tokens"])

    med = statistics.median
    results = {
        "repeats": args.repeats,
        "cold_moa_s": med(t for t, _ in cold_moa),
        "cold_single_s": med(t for t, _ in cold_single),
        "warm_moa_s": med(warm_moa),
        "warm_single_s": med(warm_single),
        "warm_moa_output_tokens": med(moa_tokens),
        "warm_single_output_tokens": med(single_tokens),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "local.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | local 3-proposer MoA | one call of the same model |")
    print("|---|---|---|")
    print(
        f"| cold start to answer (new process) | {results['cold_moa_s']:.2f} s | "
        f"{results['cold_single_s']:.2f} s |"
    )
    print(
        f"| warm answer | {results['warm_moa_s']:.2f} s "
        f"({results['warm_moa_output_tokens']:.0f} tokens generated over 4 calls) | "
        f"{results['warm_single_s']:.2f} s ({results['warm_single_output_tokens']:.0f} tokens) |"
    )


if __name__ == "__main__":
    main()

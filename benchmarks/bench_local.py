"""The embedded local model: cold start and warm answers, MoA vs one call of the same model.

- cold: a fresh process that imports the package, starts the in-process llama.cpp server,
  loads SmolLM2-135M and answers (``local`` recipe: 3 proposers + aggregator), wall time from
  process start to the answer; the same for one plain call.
- warm: in one process after a warm-up, the median over repeats of a local 3-proposer MoA
  answer and of one call of the same model (the aggregator's settings), a new question
  each time (no prompt-cache hits).

Medians of ``--repeats`` runs; the raw runs and the machine go into the JSON too.

Run: ``python benchmarks/bench_local.py`` (writes benchmarks/results/local.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from _common import print_table, write_results

QUESTION = "Give me two tips for sleeping better."
# Warm runs ask a new question each time: llama.cpp caches prompts, and with fixed seeds the
# same question gives the same drafts, so a repeated question would turn the aggregator's
# whole prompt into a cache hit (measured: 2.9 s instead of 4.7 s) and flatter the MoA.
WARM_UP = "What is a haiku?"
WARM_QUESTIONS = [
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Name three uses of a paperclip.",
    "How can I save money on groceries?",
    "What should I pack for a day hike?",
    "How do plants make food?",
    "Give me a tip for learning a new language.",
    "What is a good way to start running?",
    "How do I keep houseplants alive?",
]

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
    from langchain_moa.recipes import load_recipe

    pull_bundled_model()
    cold_moa = [cold(COLD_MOA) for _ in range(args.repeats)]
    cold_single = [cold(COLD_SINGLE) for _ in range(args.repeats)]

    moa = ChatMoA.from_recipe("local")
    single = local_chat_model(temperature=0.3, seed=7, max_tokens=200)
    moa.invoke(WARM_UP)
    single.invoke(WARM_UP)
    warm_moa, warm_single, moa_tokens, single_tokens = [], [], [], []
    for i in range(args.repeats):
        question = WARM_QUESTIONS[i % len(WARM_QUESTIONS)]
        started = time.perf_counter()
        message = moa.invoke(question)
        warm_moa.append(time.perf_counter() - started)
        moa_tokens.append(message.usage_metadata["output_tokens"])
        started = time.perf_counter()
        message = single.invoke(question)
        warm_single.append(time.perf_counter() - started)
        single_tokens.append(message.usage_metadata["output_tokens"])

    med = statistics.median
    local = load_recipe("local")
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
        },
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp via xllamacpp, 4 parallel slots)",
        "recipe": {
            "proposers": [(e.temperature, e.seed, e.max_tokens) for e in local.proposers],
            "aggregator": (
                local.aggregator.temperature,
                local.aggregator.seed,
                local.aggregator.max_tokens,
            ),
            "layers": local.layers,
        },
        "cold_question": QUESTION,
        "warm_questions": WARM_QUESTIONS[: args.repeats],
        "repeats": args.repeats,
        "cold_moa_s": med(t for t, _ in cold_moa),
        "cold_single_s": med(t for t, _ in cold_single),
        "warm_moa_s": med(warm_moa),
        "warm_single_s": med(warm_single),
        "warm_moa_output_tokens": med(moa_tokens),
        "warm_single_output_tokens": med(single_tokens),
        "runs_s": {
            "cold_moa": [t for t, _ in cold_moa],
            "cold_single": [t for t, _ in cold_single],
            "warm_moa": warm_moa,
            "warm_single": warm_single,
        },
    }
    write_results("local.json", results)
    r = results
    print_table(
        ["measure", "local 3-proposer MoA", "one call of the same model"],
        [
            ["cold start to answer (new process)", f"{r['cold_moa_s']:.2f} s",
             f"{r['cold_single_s']:.2f} s"],
            ["warm answer",
             f"{r['warm_moa_s']:.2f} s ({r['warm_moa_output_tokens']:.0f} tokens generated over "
             "4 calls)",
             f"{r['warm_single_s']:.2f} s ({r['warm_single_output_tokens']:.0f} tokens)"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()

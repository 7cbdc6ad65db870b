"""Where should the drafts go? Aggregator time to first token, on the embedded model.

The reference structure puts the drafts in the first system message, so the aggregator's
prompt differs from the proposers' from its first tokens on and a prompt cache (llama.cpp
keeps one per slot) cannot serve the conversation. With the drafts in a message after the
conversation, the conversation is a prefix the proposers' requests already processed.

For each repeat, a fresh ~1,500-token multi-turn conversation (a new first line, so no repeat
reuses another's cache) goes through the real call path: the proposer layer
(`MoAEngine.run_layer`, 3 proposers in parallel slots), then the aggregator streamed
(`calls.stream`), timing its first token, once per placement (order alternated).

Run: ``python benchmarks/bench_placement.py`` (writes benchmarks/results/placement.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import write_results
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

TOPICS = [
    ("bread", "the steps of baking a sourdough loaf, from feeding the starter to cooling"),
    ("gardening", "planning a small vegetable garden on a balcony with little sun"),
    ("cycling", "preparing a bicycle for a long tour: tyres, brakes, luggage and tools"),
    ("astronomy", "what can be seen in the night sky with a small telescope in winter"),
    ("budget", "a simple monthly budget for a student sharing a flat"),
    ("running", "a beginner plan to run five kilometres in eight weeks"),
]


def conversation(tag: int) -> list:
    """System prompt + 6 question/answer turns + a last question (~1,500 tokens)."""
    messages: list = [SystemMessage(f"Session {tag}. You are a patient, practical assistant.")]
    for topic, detail in TOPICS:
        messages.append(HumanMessage(f"Tell me about {detail}. Be concrete and complete."))
        sentences = [
            f"When it comes to {topic}, start with {detail}, and take it one step at a time.",
            f"A common mistake with {topic} is rushing; check each step before the next one.",
            f"Write down what you did for {topic}, what worked and what you would change.",
            f"Ask someone with experience in {topic} to look at your plan before you begin.",
            f"Small, regular effort on {topic} beats one long session every few weeks.",
        ]
        messages.append(AIMessage(" ".join(sentences * 2)))
    messages.append(HumanMessage("Which of these six projects should I start with this week?"))
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from langchain_moa import ChatMoA, calls
    from langchain_moa.local import local_chat_model, pull_bundled_model

    pull_bundled_model()
    proposers = [
        local_chat_model(temperature=t, seed=s, max_tokens=40)
        for t, s in [(0.6, 1), (0.8, 2), (1.0, 3)]
    ]
    aggregator = local_chat_model(temperature=0.3, seed=7, max_tokens=8)
    engines = {
        placement: ChatMoA(
            proposers=proposers, aggregator=aggregator, reference_placement=placement
        ).engine
        for placement in ("first_system", "after_conversation")
    }
    engines["first_system"].run_layer(1, conversation(-1))  # warm-up: load, first decode

    ttft: dict[str, list[float]] = {name: [] for name in engines}
    prompt_tokens: dict[str, list[int]] = {name: [] for name in engines}
    order = list(engines)
    for repeat in range(args.repeats):
        for placement in order if repeat % 2 == 0 else order[::-1]:
            engine = engines[placement]
            conv = conversation(repeat * 10 + len(ttft[placement]))
            layer = engine.run_layer(1, engine.proposer_input(conv, None))
            call = engine.aggregator_call(conv, [layer])
            started = time.perf_counter()
            first = None
            merged = None
            for chunk in calls.stream(call):
                if first is None and chunk.content:
                    first = time.perf_counter() - started
                merged = chunk if merged is None else merged + chunk
            ttft[placement].append(first if first is not None else time.perf_counter() - started)
            usage = merged.usage_metadata if merged is not None else None
            prompt_tokens[placement].append((usage or {}).get("input_tokens", 0))

    med = statistics.median
    results = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp via xllamacpp, 4 slots, prompt cache)",
        "repeats": args.repeats,
        "aggregator_prompt_tokens": {k: med(v) for k, v in prompt_tokens.items() if v},
        "ttft_s": {k: med(v) for k, v in ttft.items()},
        "runs_s": ttft,
    }
    results["speedup"] = results["ttft_s"]["first_system"] / results["ttft_s"]["after_conversation"]
    write_results("placement.json", results)
    print(json.dumps({k: results[k] for k in ("aggregator_prompt_tokens", "ttft_s", "speedup")}))


if __name__ == "__main__":
    main()

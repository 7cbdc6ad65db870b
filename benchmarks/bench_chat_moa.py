"""ChatMoA overhead over the raw provider calls, against the scripted loopback server.

Measures, with fixed server latencies:
- invoke / ainvoke latency over the critical path (sum over layers of one plain provider call,
  measured in the same process with the same clients);
- abatch over a hand-written asyncio loop making the same calls with the same concurrency;
- time to first streamed token over the critical path to the aggregator's first token.

Run: ``python benchmarks/bench_chat_moa.py`` (writes benchmarks/results/chat_moa.json).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from _common import print_table, write_results
from langchain_core.messages import HumanMessage

from langchain_moa import ChatMoA
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT
from langchain_moa.references import inject_references
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return _median(samples)


def first_token_seconds(stream: Callable[[], Iterable[Any]]) -> float:
    """Seconds from calling ``stream`` to its first chunk with content (to its end if none)."""
    started = time.perf_counter()
    for chunk in stream():
        if chunk.content:
            break
    return time.perf_counter() - started


async def atimed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return _median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.25, help="proposer latency, s")
    parser.add_argument("--aggregator-latency", type=float, default=0.3)
    parser.add_argument("--token-delay", type=float, default=0.005)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    names = [f"proposer-{i}" for i in range(args.proposers)]
    scripts = {
        name: ModelScript(
            reply=f"draft from {name}", latency=args.latency, token_delay=args.token_delay
        )
        for name in names
    }
    scripts["aggregator"] = ModelScript(
        reply="the final combined answer " * 8,
        latency=args.aggregator_latency,
        token_delay=args.token_delay,
    )
    question = [HumanMessage("How do vaccines train the immune system?")]

    with ScriptedOpenAIServer(scripts=scripts) as server:
        proposers = [server.chat_model(n, max_retries=0) for n in names]
        aggregator = server.chat_model("aggregator", max_retries=0)
        moa = ChatMoA(proposers=proposers, aggregator=aggregator, layers=args.layers)
        n_proposer_layers = args.layers - 1

        # warm connections and code paths
        moa.invoke(question)

        # ---------------------------------------------------------- sync invoke
        plain_proposer = timed(lambda: proposers[0].invoke(question), args.repeats)
        plain_aggregator = timed(lambda: aggregator.invoke(question), args.repeats)
        critical = n_proposer_layers * plain_proposer + plain_aggregator
        moa_invoke = timed(lambda: moa.invoke(question), args.repeats)

        # first token of a plain aggregator stream
        plain_ttft = _median(
            [first_token_seconds(lambda: aggregator.stream(question)) for _ in range(args.repeats)]
        )
        moa_ttft = _median(
            [first_token_seconds(lambda: moa.stream(question)) for _ in range(args.repeats)]
        )
        ttft_critical = n_proposer_layers * plain_proposer + plain_ttft

        # ----------------------------------------------------------------- async
        async def async_part() -> dict[str, float]:
            await moa.ainvoke(question)  # warm the async clients on this loop
            a_plain_proposer = await atimed(lambda: proposers[0].ainvoke(question), args.repeats)
            a_plain_aggregator = await atimed(lambda: aggregator.ainvoke(question), args.repeats)
            a_critical = n_proposer_layers * a_plain_proposer + a_plain_aggregator
            a_moa = await atimed(lambda: moa.ainvoke(question), args.repeats)

            inputs = [
                [HumanMessage(f"Question number {i}: how do tides work?")]
                for i in range(args.batch)
            ]

            async def hand_written() -> None:
                gate = asyncio.Semaphore(args.concurrency)

                async def one(conversation):
                    async with gate:
                        messages = conversation
                        for _ in range(n_proposer_layers):
                            replies = await asyncio.gather(
                                *(p.ainvoke(messages) for p in proposers)
                            )
                            messages = inject_references(
                                conversation,
                                [r.text.strip() for r in replies],
                                DEFAULT_AGGREGATOR_PROMPT,
                            )
                        await aggregator.ainvoke(messages)

                await asyncio.gather(*(one(c) for c in inputs))

            async def moa_batch() -> None:
                await moa.abatch(inputs, config={"max_concurrency": args.concurrency})

            hand = await atimed(hand_written, max(2, args.repeats // 2))
            batch = await atimed(moa_batch, max(2, args.repeats // 2))
            return {
                "ainvoke_s": a_moa,
                "ainvoke_critical_path_s": a_critical,
                "abatch_s": batch,
                "hand_written_asyncio_s": hand,
            }

        async_results = asyncio.run(async_part())

    results = {
        "config": vars(args),
        "invoke_s": moa_invoke,
        "invoke_critical_path_s": critical,
        "invoke_ratio": moa_invoke / critical,
        **async_results,
        "ainvoke_ratio": async_results["ainvoke_s"] / async_results["ainvoke_critical_path_s"],
        "abatch_ratio": async_results["abatch_s"] / async_results["hand_written_asyncio_s"],
        "ttft_s": moa_ttft,
        "ttft_critical_path_s": ttft_critical,
        "ttft_ratio": moa_ttft / ttft_critical,
    }
    write_results("chat_moa.json", results)
    a = async_results
    print_table(
        ["measure", "ChatMoA", "reference", "ratio", "target"],
        [
            ["invoke", f"{moa_invoke:.3f} s", f"critical path {critical:.3f} s",
             f"{results['invoke_ratio']:.3f}", "<= 1.10"],
            ["ainvoke", f"{a['ainvoke_s']:.3f} s",
             f"critical path {a['ainvoke_critical_path_s']:.3f} s",
             f"{results['ainvoke_ratio']:.3f}", "<= 1.10"],
            [f"abatch x{args.batch} (concurrency {args.concurrency})", f"{a['abatch_s']:.3f} s",
             f"hand-written asyncio {a['hand_written_asyncio_s']:.3f} s",
             f"{results['abatch_ratio']:.3f}", "<= 1.15"],
            ["first streamed token", f"{moa_ttft:.3f} s",
             f"critical path {ttft_critical:.3f} s", f"{results['ttft_ratio']:.3f}", "<= 1.15"],
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()

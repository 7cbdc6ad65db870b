"""Every benchmark, every number and every plot, with one command.

    pip install -e ".[test,bench]" && python benchmarks/run_all.py   # --skip-local: no SmolLM2

Writes JSON and PNG files to benchmarks/results/:

1. ``tail.json`` / ``tail_cdf.png``: latency CDF of wait-for-all against early layer close
   (``layer_quorum=3, straggler_grace=0.5``) under heavy-tailed proposers (lognormal,
   median 0.2 s, sigma 0.8; the scripted server draws each request's latency from its
   content, so both policies meet the same latencies), 4 proposers, 3 layers, aggregator
   0.1 s, 120 prompts through ``abatch`` (max_concurrency 24); answers kept per layer.
2. ``faces.json`` / ``overhead.png``: every face against the critical path (fixed
   latencies): ChatMoA invoke / ainvoke / stream, the graph, ``moa serve`` over HTTP; plus
   ``bench_chat_moa.py`` (time to first token, abatch against hand-written asyncio).
3. ``growth.json`` / ``growth.png``: calls, prompt and completion tokens per answer as
   layers and proposers grow, and what agreement early stop saves.
4. ``local.json`` / ``local.png``: the embedded model, warm MoA against one call, cold start
   (``bench_local.py``).
5. ``placement.json`` / ``placement.png``: where the drafts go, aggregator time to first
   token on the embedded model (``bench_placement.py``).
6. ``pipeline.json`` / ``pipeline.png``: ``moa generate`` over 2,000 rows at concurrency 64
   against a hand-written asyncio loop making the same calls; rows/s over time and RSS
   (``bench_pipeline.py``).
7. ``serve.json``: ``moa serve``'s OpenAI route under 500 requests at concurrency 50 against
   ``ChatMoA.abatch`` in-process; p99, RSS over two runs, clients hanging up
   (``bench_serve.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
from _common import HERE, RESULTS, percentile, write_results
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import HumanMessage

from langchain_moa import ChatMoA, build_moa_graph
from langchain_moa.testing import (
    ModelScript,
    ScriptedOpenAIServer,
    serve_in_subprocess,
    start_moa_serve,
)

# ------------------------------------------------------------------ 1. heavy tail


class RunTimer(AsyncCallbackHandler):
    """Start and end of every top-level ChatMoA run (one per abatch item)."""

    def __init__(self) -> None:
        self.started: dict[Any, float] = {}
        self.seconds: list[float] = []

    async def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: Any, parent_run_id: Any = None, **kw: Any
    ) -> None:
        if parent_run_id is None:
            self.started[run_id] = time.perf_counter()

    async def on_llm_end(
        self, response: Any, *, run_id: Any, parent_run_id: Any = None, **kw: Any
    ) -> None:
        if parent_run_id is None and run_id in self.started:
            self.seconds.append(time.perf_counter() - self.started.pop(run_id))


async def tail(prompts: int = 120, concurrency: int = 24) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI

    scripts: dict[str, dict[str, Any]] = {
        f"p{i}": {"reply": f"draft from p{i}", "lognormal": [0.2, 0.8]} for i in range(4)
    }
    scripts["agg"] = {"reply": "final answer", "latency": 0.1}
    # The server runs in its own process: sharing the client's GIL at ~100 requests a
    # second would add CPU contention to every latency and blur the tail being measured.
    base_url, process = serve_in_subprocess(scripts)

    def client(name: str) -> ChatOpenAI:
        return ChatOpenAI(model=name, api_key="sk-scripted-test", base_url=base_url, max_retries=0)

    found: dict[str, Any] = {}
    try:
        for name, quorum in (("wait_for_all", None), ("layer_quorum_3_grace_0.5", 3)):
            moa = ChatMoA(
                proposers=[client(f"p{i}") for i in range(4)],
                aggregator=client("agg"),
                layers=3,
                layer_quorum=quorum,
                straggler_grace=0.5,
            )
            timer = RunTimer()
            answers = await moa.abatch(
                [f"Question number {i}: what is good advice?" for i in range(prompts)],
                config={"max_concurrency": concurrency, "callbacks": [timer]},
            )
            kept = [
                sum(p["error"] is None for p in layer["proposals"])
                for answer in answers
                for layer in answer.response_metadata["moa"]["layers"]
            ]
            found[name] = {
                "latencies_s": sorted(timer.seconds),
                "p50_s": percentile(timer.seconds, 50),
                "p95_s": percentile(timer.seconds, 95),
                "p99_s": percentile(timer.seconds, 99),
                "answers_kept_per_layer": statistics.mean(kept),
            }
    finally:
        process.terminate()
        process.wait(timeout=30)
    found["p95_ratio"] = found["layer_quorum_3_grace_0.5"]["p95_s"] / found["wait_for_all"]["p95_s"]
    found["config"] = {
        "proposers": 4,
        "layers": 3,
        "lognormal": [0.2, 0.8],
        "aggregator_s": 0.1,
        "prompts": prompts,
        "max_concurrency": 24,
    }
    return found


async def tails() -> dict[str, Any]:
    """The target load (24 in flight, which saturates this 2-core client: ~8 ms of CPU per
    provider call in langchain-openai/httpx) and a light one where the tail shows plainly."""
    return {
        "max_concurrency_24": await tail(concurrency=24),
        "max_concurrency_4": await tail(concurrency=4),
    }


# ----------------------------------------------------------------------- 2. faces


def median_of(fn: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def amedian_of(fn: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def faces(repeats: int = 5) -> dict[str, Any]:
    scripts = {f"p{i}": ModelScript(reply=f"draft {i}", latency=0.25) for i in range(3)}
    scripts["agg"] = ModelScript(reply="final answer", latency=0.3)
    with ScriptedOpenAIServer(scripts=scripts) as server:
        proposers = [server.chat_model(f"p{i}") for i in range(3)]
        aggregator = server.chat_model("agg")
        moa = ChatMoA(proposers=proposers, aggregator=aggregator, layers=3)
        graph = build_moa_graph(proposers, aggregator, layers=3)
        question = [HumanMessage("What is MoA?")]
        moa.invoke(question), graph.invoke({"messages": question})  # warm up

        def critical_path() -> None:  # one plain call per layer, the algorithm's floor
            (
                proposers[0].invoke(question),
                proposers[0].invoke(question),
                aggregator.invoke(question),
            )

        seconds = {
            "critical path": median_of(critical_path, repeats),
            "ChatMoA.invoke": median_of(lambda: moa.invoke(question), repeats),
            "ChatMoA.ainvoke": await amedian_of(lambda: moa.ainvoke(question), repeats),
            "ChatMoA.stream": median_of(lambda: list(moa.stream(question)), repeats),
            "graph.invoke": median_of(lambda: graph.invoke({"messages": question}), repeats),
            "graph.ainvoke": await amedian_of(
                lambda: graph.ainvoke({"messages": question}), repeats
            ),
        }
        config = RESULTS / "serve_bench.toml"
        entry = 'model = "{}"\nbase_url = "' + server.base_url + '"\n'
        config.write_text(
            "layers = 3\n"
            + "".join("[[proposers]]\n" + entry.format(f"p{i}") for i in range(3))
            + "[aggregator]\n"
            + entry.format("agg")
        )
        base, process = start_moa_serve(config)
        try:
            url = f"{base}/invoke"
            with httpx.Client(timeout=60) as http:
                http.post(url, json={"input": "What is MoA?"})  # warm up
                seconds["moa serve (HTTP)"] = median_of(
                    lambda: http.post(url, json={"input": "What is MoA?"}).raise_for_status(),
                    repeats,
                )
        finally:
            process.terminate()
            process.wait(timeout=30)
            config.unlink()
    floor = seconds["critical path"]
    return {
        "seconds": seconds,
        "ratio": {k: v / floor for k, v in seconds.items() if k != "critical path"},
        "config": {
            "proposers": 3,
            "layers": 3,
            "proposer_s": 0.25,
            "aggregator_s": 0.3,
            "repeats": repeats,
        },
    }


# ---------------------------------------------------------------------- 3. growth


def growth() -> dict[str, Any]:
    scripts = {f"p{i}": ModelScript(reply=f"A draft answer from proposer {i}.") for i in range(5)}
    scripts |= {f"same{i}": ModelScript(reply="Paris.") for i in range(3)}
    scripts["agg"] = ModelScript(reply="The final answer, written from the drafts.")
    with ScriptedOpenAIServer(scripts=scripts) as server:

        def measure(names: list[str], layers: int, early_stop: Any = None) -> dict[str, int]:
            server.reset()
            moa = ChatMoA(
                proposers=[server.chat_model(n) for n in names],
                aggregator=server.chat_model("agg"),
                layers=layers,
                early_stop=early_stop,
            )
            usage = moa.invoke("What is the capital of France?").usage_metadata or {}
            calls = sum(len(server.requests_for(n)) for n in [*names, "agg"])
            return {
                "calls": calls,
                "prompt_tokens": usage.get("input_tokens", 0),
                "completion_tokens": usage.get("output_tokens", 0),
            }

        by_layers = {n: measure([f"p{i}" for i in range(3)], n) for n in range(1, 6)}
        by_proposers = {n: measure([f"p{i}" for i in range(n)], 2) for n in range(1, 6)}
        agreeing = [f"same{i}" for i in range(3)]
        early = {
            "without": measure(agreeing, 5),
            "with agreement early stop": measure(agreeing, 5, "agreement"),
        }
    return {
        "by_layers_3_proposers": by_layers,
        "by_proposers_2_layers": by_proposers,
        "early_stop_5_layers_3_agreeing": early,
    }


# ------------------------------------------------------------------------ plots


def bar_chart(
    plt: Any,
    name: str,
    bars: dict[str, float],
    colors: list[str],
    shown: str,
    horizontal: bool = False,
    figsize: tuple[float, float] = (6, 3.5),
    **axes: Any,
) -> None:
    """One bar per entry of ``bars`` (label: value), each marked with its value formatted by
    ``shown``; ``axes`` (labels, title) go to ``Axes.set``; saved as ``results/<name>``."""
    fig, ax = plt.subplots(figsize=figsize)
    labels, values = list(bars), list(bars.values())
    if horizontal:
        ax.barh(labels, values, color=colors)
        for y, value in enumerate(values):
            ax.text(value, y, " " + shown.format(value), va="center", fontsize=8)
    else:
        ax.bar(labels, values, color=colors)
        for x, value in enumerate(values):
            ax.text(x, value, shown.format(value), ha="center", va="bottom", fontsize=8)
    ax.set(**axes)
    save(fig, name)


def save(fig: Any, name: str) -> None:
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)


def plot(tail_data: dict, faces_data: dict, growth_data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    policies = (
        ("wait_for_all", "wait for all (reference)"),
        ("layer_quorum_3_grace_0.5", "layer_quorum=3, straggler_grace=0.5"),
    )
    for ax, (load, data) in zip(axes, tail_data.items(), strict=True):
        for name, label in policies:
            values = data[name]["latencies_s"]
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"{label}: p95 {data[name]['p95_s']:.2f} s, "
                    f"{data[name]['answers_kept_per_layer']:.2f}/4 drafts kept")  # fmt: skip
        ax.axhline(0.95, color="grey", lw=0.6, ls=":")
        ax.set(xlabel="seconds per answer", title=f"{load.replace('_', ' ')}: p95 ratio "
               f"{data['p95_ratio']:.2f}")  # fmt: skip
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("fraction of answers")
    fig.suptitle(
        "Heavy-tailed proposers (lognormal 0.2 s, sigma 0.8), 4 proposers, 3 layers, 120 prompts"
    )
    save(fig, "tail_cdf.png")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ratios = faces_data["ratio"]
    ax.barh(list(ratios), list(ratios.values()), color="#4c72b0")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1.10, color="grey", lw=0.8, ls="--", label="target 1.10")
    for y, value in enumerate(ratios.values()):
        ax.text(value + 0.005, y, f"{value:.3f}", va="center", fontsize=8)
    ax.set(xlim=(0.9, max(1.2, max(ratios.values()) + 0.05)), xlabel="time / critical path",
           title="Overhead of every face over the raw provider calls")  # fmt: skip
    ax.legend(fontsize=8)
    save(fig, "overhead.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title in (
        (axes[0], "by_layers_3_proposers", "3 proposers, layers 1-5"),
        (axes[1], "by_proposers_2_layers", "2 layers, proposers 1-5"),
    ):
        data = growth_data[key]
        xs = [int(x) for x in data]
        for metric in ("calls", "prompt_tokens", "completion_tokens"):
            ax.plot(xs, [data[x][metric] for x in data], marker="o", label=metric)
        ax.set(title=title, xlabel=key.split("_")[1], yscale="log")
        ax.legend(fontsize=8)
    early = growth_data["early_stop_5_layers_3_agreeing"]
    names = list(early)
    width = 0.35
    for i, metric in enumerate(("calls", "prompt_tokens")):
        axes[2].bar(
            [j + i * width for j in range(len(names))],
            [early[n][metric] for n in names],
            width,
            label=metric,
        )
    axes[2].set_xticks([j + width / 2 for j in range(len(names))], names, fontsize=8)
    axes[2].set(title="5 layers, 3 agreeing proposers", yscale="log")
    axes[2].legend(fontsize=8)
    save(fig, "growth.png")

    local = RESULTS / "local.json"
    if local.exists():
        data = json.loads(local.read_text())
        bars = {
            "warm, one call": data["warm_single_s"],
            "warm, MoA": data["warm_moa_s"],
            "cold, one call": data["cold_single_s"],
            "cold, MoA": data["cold_moa_s"],
        }
        colors = ["#55a868", "#4c72b0", "#8fd19e", "#8da0cb"]
        title = "Embedded SmolLM2-135M on 2 CPU cores (local recipe)"
        bar_chart(plt, "local.png", bars, colors, "{:.1f} s", ylabel="seconds", title=title)

    placement = RESULTS / "placement.json"
    if placement.exists():
        data = json.loads(placement.read_text())
        bars = {
            "drafts in the first system message\n(reference)": data["ttft_s"]["first_system"],
            "drafts after the conversation": data["ttft_s"]["after_conversation"],
        }
        title = f"~1,500-token conversation, llama.cpp prompt cache: {data['speedup']:.1f}x"
        bar_chart(
            plt, "placement.png", bars, ["#c44e52", "#55a868"], "{:.1f} s", horizontal=True,
            figsize=(6, 3.2), xlabel="aggregator time to first token (s)", title=title,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-local", action="store_true", help="skip the embedded-model runs")
    parser.add_argument("--only", choices=["tail", "faces", "growth"], help="one part, then plots")
    args = parser.parse_args()
    if args.only:
        parts = {
            "tail": lambda: asyncio.run(tails()),
            "faces": lambda: asyncio.run(faces()),
            "growth": growth,
        }
        write_results(f"{args.only}.json", parts[args.only]())
        plot(
            *(json.loads((RESULTS / f"{n}.json").read_text()) for n in ("tail", "faces", "growth"))
        )
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, str(HERE / "bench_chat_moa.py")], check=True, env=env)
    subprocess.run([sys.executable, str(HERE / "bench_pipeline.py")], check=True, env=env)
    subprocess.run([sys.executable, str(HERE / "bench_serve.py")], check=True, env=env)
    if not args.skip_local:
        subprocess.run([sys.executable, str(HERE / "bench_local.py")], check=True, env=env)
        subprocess.run([sys.executable, str(HERE / "bench_placement.py")], check=True, env=env)
    tail_data = asyncio.run(tails())
    write_results("tail.json", tail_data)
    print("tail p95 ratios:", {k: v["p95_ratio"] for k, v in tail_data.items()}, flush=True)
    faces_data = asyncio.run(faces())
    write_results("faces.json", faces_data)
    print("faces:", faces_data["ratio"], flush=True)
    growth_data = growth()
    write_results("growth.json", growth_data)
    plot(tail_data, faces_data, growth_data)
    print(f"plots and numbers in {RESULTS}")


if __name__ == "__main__":
    main()

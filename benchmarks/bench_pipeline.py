"""`moa generate` at scale against a hand-written asyncio loop making the same calls.

    python benchmarks/bench_pipeline.py            # 2,000 rows, --concurrency 64

The scripted server (own process) answers 3 proposers and an aggregator, 0.2 s each. Both
contenders run as their own process, so each is measured the way a user runs it:

- ``moa generate IN OUT --config cfg.toml --concurrency 64`` (the real CLI: lock, resume
  bookkeeping, fsync per row, progress tracer);
- a hand-written loop: ``asyncio.Semaphore(64)`` over the rows, the 3 proposer calls with
  ``asyncio.gather``, then the aggregator with the drafts in a system message, through the
  same ``ChatOpenAI`` clients, each row written as one JSON line.

The benchmark polls OUT's line count and the process's RSS every 0.25 s: rows/s over time
(``pipeline.png``), peak RSS growth over the run (peak minus RSS when the first row was
written, i.e. after imports). Results in ``results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write_results

from langchain_moa.testing import serve_in_subprocess

PROPOSERS = ["p1", "p2", "p3"]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def lines_in(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0


def watch(command: list[str], out: Path, rows: int) -> dict[str, Any]:
    """Run `command`, sampling OUT's rows and the RSS; wall time from start to exit."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    first_row_rss = None
    peak = 0.0
    while proc.poll() is None:
        time.sleep(0.25)
        now, done, rss = time.perf_counter() - started, lines_in(out), rss_mb(proc.pid)
        samples.append((round(now, 2), done))
        if rss is not None:
            peak = max(peak, rss)
            if done and first_row_rss is None:
                first_row_rss = rss
    wall = time.perf_counter() - started
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({proc.returncode}): {err[-2000:]}")
    written = lines_in(out)
    assert written == rows, (written, rows, err[-500:])
    first = next(t for t, n in samples if n) if any(n for _, n in samples) else 0.0
    return {
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
        "rows_per_s_after_first_row": round((rows - 1) / max(wall - first, 1e-9), 1),
        "first_row_s": first,
        "rss_first_row_mb": round(first_row_rss or 0, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - (first_row_rss or peak), 1),
        "timeline": samples,
    }


async def hand_written(source: Path, out: Path, base_url: str, concurrency: int) -> None:
    """The baseline: what a careful user writes by hand with the same clients."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    def client(name: str) -> ChatOpenAI:
        return ChatOpenAI(model=name, base_url=base_url, api_key="sk-scripted-test")

    proposers = [client(name) for name in PROPOSERS]
    aggregator = client("agg")
    gate = asyncio.Semaphore(concurrency)
    prompts = [json.loads(line)["prompt"] for line in source.read_text().splitlines()]
    with open(out, "a", encoding="utf-8") as handle:

        async def row(prompt: str) -> None:
            async with gate:
                question = [HumanMessage(prompt)]
                drafts = await asyncio.gather(*(p.ainvoke(question) for p in proposers))
                refs = "\n".join(f"{i}. {d.text}" for i, d in enumerate(drafts, 1))
                answer = await aggregator.ainvoke([SystemMessage("Combine:\n" + refs), *question])
                handle.write(json.dumps({"prompt": prompt, "answer": answer.text}) + "\n")
                handle.flush()

        await asyncio.gather(*(row(p) for p in prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--baseline", nargs=3, metavar=("IN", "OUT", "BASE_URL"))
    args = parser.parse_args()
    if args.baseline:
        source, out, base_url = args.baseline
        asyncio.run(hand_written(Path(source), Path(out), base_url, args.concurrency))
        return

    scripts = {name: {"reply": f"draft from {name}", "latency": 0.2} for name in PROPOSERS}
    scripts["agg"] = {"reply": "final answer", "latency": 0.2}
    base_url, server = serve_in_subprocess(scripts)
    env_key = {"SCRIPTED_KEY": "sk-scripted-test"}
    os.environ.update(env_key)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            source = folder / "in.jsonl"
            source.write_text(
                "".join(
                    json.dumps({"prompt": f"Question {i}: what helps?"}) + "\n"
                    for i in range(args.rows)
                )  # fmt: skip
            )
            entry = f'base_url = "{base_url}"\napi_key_env = "SCRIPTED_KEY"\n'
            config = folder / "cfg.toml"
            config.write_text(
                "layers = 2\n"
                + "".join(f'[[proposers]]\nmodel = "{p}"\n{entry}' for p in PROPOSERS)
                + f'[aggregator]\nmodel = "agg"\n{entry}'
            )
            for name, command, out in (
                ("hand_written_asyncio",
                 [sys.executable, __file__, "--concurrency", str(args.concurrency),
                  "--baseline", str(source), str(folder / "base.jsonl"), base_url],
                 folder / "base.jsonl"),
                ("moa_generate",
                 [sys.executable, "-m", "langchain_moa.cli", "generate", str(source),
                  str(folder / "sft.jsonl"), "--config", str(config),
                  "--concurrency", str(args.concurrency)],
                 folder / "sft.jsonl"),
            ):  # fmt: skip
                results[name] = watch(command, out, args.rows)
                print(name, {k: v for k, v in results[name].items() if k != "timeline"})
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["ratio_rows_per_s"] = round(
        results["moa_generate"]["rows_per_s"] / results["hand_written_asyncio"]["rows_per_s"], 3
    )
    results["config"] = {
        "rows": args.rows,
        "concurrency": args.concurrency,
        "proposers": 3,
        "latency_s": 0.2,
        "cpus": os.cpu_count(),
    }
    write_results("pipeline.json", results)
    print("rows/s ratio (moa generate / hand-written):", results["ratio_rows_per_s"])
    plot(results)


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, label, color in (
        ("hand_written_asyncio", "hand-written asyncio loop", "#4c72b0"),
        ("moa_generate", "moa generate (lock, resume, fsync, progress)", "#55a868"),
    ):
        timeline = results[name]["timeline"]
        times, rates = [], []
        for (t0, n0), (t1, n1) in zip(timeline, timeline[4:], strict=False):  # 1 s windows
            times.append(t1)
            rates.append((n1 - n0) / (t1 - t0))
        ax.plot(times, rates, label=f"{label}: {results[name]['rows_per_s']} rows/s", color=color)
    config = results["config"]
    ax.set(
        xlabel="seconds since start (process start, imports included)",
        ylabel="rows/s (1 s window)",
        title=f"{config['rows']} rows, 3 proposers + aggregator at 0.2 s, "
        f"concurrency {config['concurrency']}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "pipeline.png", dpi=120)


if __name__ == "__main__":
    main()

"""`moa serve` under load: the OpenAI-compatible route against ChatMoA.abatch in-process.

    python benchmarks/bench_serve.py

The scripted upstream runs in its own process (3 proposers at 0.2 s, aggregator 0.1 s).
``moa serve --max-runs 50`` runs as users start it. 500 requests at concurrency 50 go to
``/v1/chat/completions`` (httpx, keep-alive), twice, and the server's RSS is read after
each run; the same 500 questions then go through ``ChatMoA.abatch(max_concurrency=50)`` in
this process with the same upstream. Last, 20 clients hang up 0.4 s into their request
(the proposers take 1 s there) and the upstream's log says whether anything was called
for them afterwards. Results in ``results/serve.json``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import percentile, write_results

from langchain_moa.testing import (
    ModelScript,
    ScriptedOpenAIServer,
    serve_in_subprocess,
    start_moa_serve,
)

PROPOSERS = ["p1", "p2", "p3"]


def config_text(base_url: str, name: str = "bench") -> str:
    entry = f'base_url = "{base_url}"\napi_key_env = "SCRIPTED_KEY"\n'
    return (f'name = "{name}"\nlayers = 2\n'
            + "".join(f'[[proposers]]\nmodel = "{p}"\n{entry}' for p in PROPOSERS)
            + f'[aggregator]\nmodel = "agg"\n{entry}')  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(root: str, requests: int, concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal errors
            body = {"model": "bench", "messages": [{"role": "user", "content": f"Question {i}"}]}
            async with gate:
                started = time.perf_counter()
                response = await client.post(f"{root}/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    return {
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "errors": errors,
    }


async def in_process(base_url: str, requests: int, concurrency: int) -> dict[str, Any]:
    from langchain_openai import ChatOpenAI

    from langchain_moa import ChatMoA

    def client(name: str) -> ChatOpenAI:
        return ChatOpenAI(model=name, base_url=base_url, api_key="sk-scripted-test")

    moa = ChatMoA(proposers=[client(p) for p in PROPOSERS], aggregator=client("agg"))
    started = time.perf_counter()
    await moa.abatch([f"Question {i}" for i in range(requests)],
                     config={"max_concurrency": concurrency})  # fmt: skip
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 1)}


async def hang_ups(folder: Path, clients: int = 20) -> dict[str, Any]:
    scripts = {p: ModelScript(reply=f"draft {p}", latency=1.0) for p in PROPOSERS}
    scripts["agg"] = ModelScript(reply="answer", latency=0.1)
    with ScriptedOpenAIServer(scripts=scripts) as upstream:
        config = folder / "hangup.toml"
        config.write_text(config_text(upstream.base_url))
        base, process = start_moa_serve(config, env={"SCRIPTED_KEY": "sk-scripted-test"},
                                        args=["--max-runs", "50"])  # fmt: skip
        root = base.removesuffix("/moa")
        try:
            async with httpx.AsyncClient(timeout=0.4) as client:

                async def leave(i: int) -> None:
                    body = {"model": "bench",
                            "messages": [{"role": "user", "content": f"hang up {i}"}]}  # fmt: skip
                    try:
                        await client.post(f"{root}/v1/chat/completions", json=body)
                    except httpx.TimeoutException:
                        pass

                await asyncio.gather(*(leave(i) for i in range(clients)))
            left_at = time.perf_counter()
            await asyncio.sleep(1.5)  # every proposer would have answered by now
            ours = [r for r in upstream.requests if "hang up" in str(r.messages[-1:])]
            after = [r for r in ours if r.started > left_at + 0.05]
            return {
                "clients": clients,
                "upstream_calls_before_hang_up": len(ours) - len(after),
                "upstream_calls_after_hang_up": len(after),
                "aggregator_calls": sum(r.model == "agg" for r in ours),
            }
        finally:
            process.terminate()
            process.wait(timeout=30)


async def main(requests: int = 500, concurrency: int = 50) -> dict[str, Any]:
    scripts = {p: {"reply": f"draft from {p}", "latency": 0.2} for p in PROPOSERS}
    scripts["agg"] = {"reply": "final answer", "latency": 0.1}
    base_url, upstream = serve_in_subprocess(scripts)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            config = folder / "bench.toml"
            config.write_text(config_text(base_url))
            flags = ["--max-runs", "50", "--max-queue", "1000"]
            env = {"SCRIPTED_KEY": "sk-scripted-test"}
            base, server = start_moa_serve(config, env=env, args=flags)
            root = base.removesuffix("/moa")
            try:
                rss = [round(rss_mb(server.pid), 1)]
                for run in (1, 2):
                    results[f"serve_run_{run}"] = await load(root, requests, concurrency)
                    rss.append(round(rss_mb(server.pid), 1))
                    print(f"serve run {run}", results[f"serve_run_{run}"], "RSS", rss[-1], "MB")
                results["server_rss_mb"] = {"started": rss[0], "after_run_1": rss[1],
                                            "after_run_2": rss[2]}  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=30)
            results["in_process_abatch"] = await in_process(base_url, requests, concurrency)
            print("in-process abatch", results["in_process_abatch"])
            results["hang_ups"] = await hang_ups(folder)
            print("hang-ups", results["hang_ups"])
    finally:
        upstream.terminate()
        upstream.wait(timeout=30)
    best = max(results["serve_run_1"]["requests_per_s"], results["serve_run_2"]["requests_per_s"])
    results["throughput_ratio"] = round(best / results["in_process_abatch"]["requests_per_s"], 3)
    results["config"] = {
        "requests": requests, "concurrency": concurrency, "proposers": 3,
        "proposer_s": 0.2, "aggregator_s": 0.1, "cpus": os.cpu_count(),
    }  # fmt: skip
    write_results("serve.json", results)
    print("throughput ratio (served / in-process):", results["throughput_ratio"])
    return results


if __name__ == "__main__":
    asyncio.run(main())

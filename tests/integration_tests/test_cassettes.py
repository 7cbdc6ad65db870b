"""Recorded real traffic, replayed offline (pytest-recording, record mode "none").

The cassettes hold real exchanges with SmolLM2-135M-Instruct served by the embedded
llama.cpp server. Replaying them exercises the whole HTTP layer (openai SDK, httpx, SSE
parsing, usage fields) with no server at all. To re-record:

    MOA_RECORD_BASE_URL=<local server /v1 URL> pytest tests/integration_tests/test_cassettes.py \
        --record-mode=rewrite

(`python -c "from langchain_moa.local import local_server; print(local_server().base_url)"`
prints one; keep that process alive while recording.)
"""

from __future__ import annotations

import os

import pytest
from langchain_openai import ChatOpenAI

from langchain_moa import ChatMoA

pytestmark = [pytest.mark.vcr, pytest.mark.http]

BASE_URL = os.environ.get("MOA_RECORD_BASE_URL", "http://127.0.0.1:9/v1")
MODEL = "smollm2-135m-instruct"
QUESTION = "Name one planet of the solar system."


def local_client(temperature: float, seed: int, max_tokens: int) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=BASE_URL,
        api_key="local-no-key",
        temperature=temperature,
        seed=seed,
        max_tokens=max_tokens,
        max_retries=0,
        stream_usage=True,
    )


def recorded_moa() -> ChatMoA:
    return ChatMoA(
        proposers=[local_client(0.7, 1, 24), local_client(0.9, 2, 24), local_client(1.1, 3, 24)],
        aggregator=local_client(0.2, 4, 32),
    )


def test_replayed_moa_invoke(vcr) -> None:
    message = recorded_moa().invoke(QUESTION)
    assert message.content.strip()
    proposals = message.response_metadata["moa"]["layers"][0]["proposals"]
    assert len(proposals) == 3 and all(p["answer"] for p in proposals)
    assert (
        message.usage_metadata["total_tokens"]
        == sum(p["usage"]["total_tokens"] for p in proposals)
        + message.response_metadata["moa"]["aggregator"]["usage"]["total_tokens"]
    )
    if vcr.record_mode == "none":
        assert vcr.play_count == 4  # three proposers and the aggregator, all from the cassette


async def test_replayed_moa_astream(vcr) -> None:
    chunks = [c async for c in recorded_moa().astream(QUESTION)]
    assert sum(1 for c in chunks if c.content) > 1
    merged = sum(chunks[1:], chunks[0])
    assert merged.content.strip()
    assert merged.usage_metadata["output_tokens"] > 0

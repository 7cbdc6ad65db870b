"""LangGraph deployment entry point: the MoA graph built from a recipe.

`langgraph.json` points at ``./graphs/moa.py:graph``. The recipe is named by the
``MOA_RECIPE`` environment variable: ``local`` (default; the embedded SmolLM2 model, no API
key), a shipped recipe such as ``together-moa``, or a path to a TOML/YAML config file. The
graph is compiled without a checkpointer: LangGraph Server (``langgraph dev`` /
``langgraph up``) supplies persistence, and rejects graphs that bring their own.

LangGraph Server reads ``graph`` from the module's namespace, so it is built at import;
`make_graph` builds one for another recipe.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_RECIPE = "local"


def make_graph(recipe: str | None = None) -> Any:
    """Compile the MoA graph for `recipe` (default: ``$MOA_RECIPE``, else ``local``)."""
    # Imported here so this file can be loaded (and `make_graph` called with a patched
    # recipe loader) without importing anything at module import but this function.
    from langchain_moa.graph import build_moa_graph
    from langchain_moa.recipes import load_recipe

    name = recipe or os.environ.get("MOA_RECIPE") or DEFAULT_RECIPE
    return build_moa_graph(**load_recipe(name).chat_moa_kwargs(), name="moa")


graph = make_graph()

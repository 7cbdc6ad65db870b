"""Deployable judge graph: best-of-N with an MoA-ensemble judge (see langgraph.json).

Configured from the recipe named by ``MOA_RECIPE`` (default ``local``): the recipe's
proposers are the judges, its aggregator aggregates their verdicts and also generates the
candidates. ``MOA_JUDGE_N`` (default 3) candidates per round, ``MOA_JUDGE_THRESHOLD``
(win rate, default unset) triggers regeneration. Compiled without a checkpointer: the
LangGraph server supplies persistence.
"""

from __future__ import annotations

import os

from langchain_moa import MoAJudge, build_judge_graph


def make_graph():
    from langchain_moa.recipes import load_recipe

    recipe = load_recipe(os.environ.get("MOA_RECIPE", "local"))
    kwargs = recipe.chat_moa_kwargs()
    all_local = all(e.provider == "local" for e in [*recipe.proposers, recipe.aggregator])
    judge = MoAJudge(
        judges=kwargs["proposers"] or [kwargs["aggregator"]],
        aggregator=kwargs["aggregator"],
        mode="pairwise",
        swap=True,
        grammar=all_local,
    )
    threshold = os.environ.get("MOA_JUDGE_THRESHOLD")
    return build_judge_graph(
        judge,
        kwargs["aggregator"],
        n=int(os.environ.get("MOA_JUDGE_N", "3")),
        threshold=float(threshold) if threshold else None,
    )


graph = make_graph()

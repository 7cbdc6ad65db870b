"""`moa generate` and `moa label`: the MoAA data pipelines on the command line."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from rich.console import Console

from langchain_moa.errors import ConfigError

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _recipe_models(args: argparse.Namespace) -> dict[str, Any]:
    from langchain_moa.recipes import load_recipe

    recipe = load_recipe(args.config or args.recipe)
    kwargs = recipe.chat_moa_kwargs()
    if args.layers is not None:
        kwargs["layers"] = args.layers
    kwargs["all_local"] = all(e.provider == "local" for e in [*recipe.proposers, recipe.aggregator])
    return kwargs


def build_policy(spec: str) -> Any:
    """``local`` (the embedded model) or an ``init_chat_model`` string."""
    if spec == "local":
        from langchain_moa.local import local_chat_model

        return local_chat_model(max_tokens=256)
    from langchain_moa.models import resolve_model

    return resolve_model(spec, role="--policy")


def _report(summary: Any, output: str, push: str | None) -> int:
    err.print(
        f"{summary.written} written, {summary.skipped} already done, {summary.failed} failed "
        f"(of {summary.total} rows) -> {output}"
    )
    for failure in summary.failures[:10]:
        where = f"line {failure.get('line')}" + (
            f" (id {failure['id']})" if failure.get("id") else ""
        )
        err.print(f"  {where}: {failure['reason']}", markup=False)
    if summary.failed > 10:
        err.print(f"  ... {summary.failed - 10} more in {summary.errors_path}", markup=False)
    if push:
        from langchain_moa.pipelines import push_to_hub

        url = push_to_hub(output, push)
        err.print(f"uploaded to {url}", markup=False)
    return 0 if summary.ok else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.pipelines import agenerate

    kwargs = _recipe_models(args)
    kwargs.pop("all_local")
    moa = ChatMoA(**kwargs)
    summary = asyncio.run(agenerate(args.input, args.output, moa, concurrency=args.concurrency))
    return _report(summary, args.output, args.push_to_hub)


def cmd_label(args: argparse.Namespace) -> int:
    from langchain_moa.judge import MoAJudge
    from langchain_moa.pipelines import alabel

    models = _recipe_models(args)
    criteria: Any = None
    if args.criteria == "dynamic":
        criteria = "dynamic"
    elif args.criteria:
        criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    judge = MoAJudge(
        judges=models["proposers"] or [models["aggregator"]],
        aggregator=None if args.no_aggregate else models["aggregator"],
        mode=args.mode,
        swap=not args.no_swap,
        criteria=criteria,
        # llama.cpp grammars make small local models give parseable verdicts
        grammar=models["all_local"],
    )
    policy = build_policy(args.policy) if args.policy else None
    summary = asyncio.run(
        alabel(
            args.input,
            args.output,
            judge,
            policy=policy,
            samples=args.samples,
            concurrency=args.concurrency,
        )  # fmt: skip
    )
    return _report(summary, args.output, args.push_to_hub)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def register(sub: Any, add_model_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the data subcommands to the `moa` parser."""
    gen = sub.add_parser("generate", help="SFT data: the MoA answer for every prompt (TRL format)")
    gen.add_argument("input", help="JSONL file, or hf://datasets/OWNER/NAME/FILE.jsonl")
    gen.add_argument("output", help="JSONL file to append to (re-runs skip rows already there)")
    add_model_options(gen)
    gen.add_argument("--concurrency", type=_positive, default=4, help="rows in flight")
    gen.add_argument("--push-to-hub", metavar="REPO", help="upload OUT as a dataset (HF_TOKEN)")
    gen.set_defaults(func=cmd_generate)

    lab = sub.add_parser("label", help="DPO data: chosen/rejected pairs ranked by an MoA judge")
    lab.add_argument("input", help="JSONL file, or hf://datasets/OWNER/NAME/FILE.jsonl")
    lab.add_argument("output", help="JSONL file to append to (re-runs skip rows already there)")
    add_model_options(lab)
    lab.add_argument(
        "--policy", help="sample candidates from this model: 'local' or provider:model"
    )
    lab.add_argument("--samples", type=_positive, default=5, help="candidates per prompt")
    lab.add_argument("--mode", choices=["pairwise", "pointwise"], default="pairwise")
    lab.add_argument("--no-swap", action="store_true", help="judge each pair in one order only")
    lab.add_argument("--no-aggregate", action="store_true", help="plain ensemble, no aggregator")
    lab.add_argument("--criteria", help="'dynamic', or comma-separated criteria")
    lab.add_argument("--concurrency", type=_positive, default=4, help="rows in flight")
    lab.add_argument("--push-to-hub", metavar="REPO", help="upload OUT as a dataset (HF_TOKEN)")
    lab.set_defaults(func=cmd_label)


__all__ = ["ConfigError", "build_policy", "register"]

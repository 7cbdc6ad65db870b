"""`moa generate` and `moa label`: the MoAA data pipelines on the command line."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from langchain_moa.cli.options import (
    _positive,
    _temperature,
    add_model_options,
    add_run_shape_options,
    add_sampling_options,
    moa_kwargs_for,
    model_source,
)
from langchain_moa.cli.output import EXIT_INTERRUPTED, err
from langchain_moa.errors import ConfigError


def _recipe(args: argparse.Namespace) -> Any:
    from langchain_moa.recipes import load_recipe

    return load_recipe(model_source(args))


def _all_local(recipe: Any) -> bool:
    return all(e.provider == "local" for e in [*recipe.proposers, recipe.aggregator])


def _recipe_models(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's models with the command's flags applied (the builder `moa chat` uses)."""
    recipe, kwargs = moa_kwargs_for(model_source(args), args)
    kwargs["all_local"] = _all_local(recipe)
    kwargs["label"] = recipe.label
    return kwargs


def build_policy(spec: str) -> Any:
    """``local`` (the embedded model) or an ``init_chat_model`` string."""
    if spec == "local":
        from langchain_moa.local import local_chat_model

        return local_chat_model(max_tokens=256)
    from langchain_moa.models import resolve_model

    return resolve_model(spec, role="--policy")


def _report(summary: Any, output: str) -> int:
    err.print(f"{summary.describe()} -> {output}", markup=False)
    for failure in summary.failures[:10]:
        where = f"line {failure.get('line')}" + (
            f" (id {failure['id']})" if failure.get("id") else ""
        )
        err.print(f"  {where}: {failure['reason']}", markup=False)
    if len(summary.failures) > 10:
        err.print(f"  ... {len(summary.failures) - 10} more in {summary.errors_path}", markup=False)
    if summary.changed:
        err.print(_changed_line(summary.changed, output), markup=False)
    if summary.uploaded_to:
        err.print(f"uploaded to {summary.uploaded_to}", markup=False)
    return 0 if summary.ok else 1


def _changed_line(changed: list[dict[str, Any]], output: str) -> str:
    """One line for the rows whose id is done but whose content was edited since."""
    from langchain_moa.redaction import one_line

    ids = ", ".join(one_line(str(c["id"]), 40) for c in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    n = len(changed)
    rows = "row was" if n == 1 else "rows were"
    return (
        f"  {n} {rows} not redone although the input changed under an id already in "
        f"{output} ({ids}{more}): an id marks its row done; to redo one, remove its line "
        "from OUT or give it a new id"
    )


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    from langchain_moa.data.rows import parse_shard

    return {
        "concurrency": args.concurrency,
        "shard": parse_shard(args.shard),
        "keep_duplicates": args.keep_duplicates,
        "push_to_hub": args.push_to_hub,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.data import agenerate, check_system

    options = _run_options(args)  # flags first: a bad --shard costs no model start
    check_system(args.system)
    kwargs = _recipe_models(args)
    kwargs.pop("all_local")
    kwargs.pop("label", None)
    moa = ChatMoA(**kwargs)
    run = agenerate(args.input, args.output, moa, system=args.system, **options)
    return _run_and_report(run, args.output)


def cmd_label(args: argparse.Namespace) -> int:
    from langchain_moa.data import alabel
    from langchain_moa.judge import MoAJudge
    from langchain_moa.recipes import LabelSettings

    options = _run_options(args)
    recipe = _recipe(args)
    check_label_flags(args, recipe.label)  # before any model starts
    if (args.mode or recipe.label.mode) == "likelihood" and not _all_local(recipe):
        raise ConfigError(
            "--mode likelihood reads llama.cpp grammars and token probabilities, so every judge "
            "must be a local model (e.g. --recipe local); pass --mode pointwise or pairwise"
        )
    models = _recipe_models(args)
    defaults = models.get("label") or LabelSettings()
    criteria: Any = None
    if args.criteria == "dynamic":
        criteria = "dynamic"
    elif args.criteria:
        criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    mode = args.mode or defaults.mode
    aggregate = defaults.aggregate if args.aggregate is None else args.aggregate
    judge = MoAJudge(
        judges=models["proposers"] or [models["aggregator"]],
        aggregator=models["aggregator"] if aggregate and mode != "likelihood" else None,
        mode=mode,
        scoring="verdict" if mode == "likelihood" else args.scoring or defaults.scoring,
        swap=defaults.swap if args.swap is None else args.swap,
        criteria=criteria,
        # llama.cpp grammars make small local models give parseable verdicts
        grammar=models["all_local"],
    )
    policy = build_policy(args.policy) if args.policy else None
    samples = args.samples or defaults.samples
    run = alabel(
        args.input, args.output, judge, policy=policy, samples=samples,
        temperature=args.policy_temperature, system=args.system, **options,
    )  # fmt: skip
    return _run_and_report(run, args.output)


def _run_and_report(run: Any, output: str) -> int:
    """Run a pipeline; on Ctrl-C, report what was written so far and exit 130.

    asyncio.run turns Ctrl-C into a cancellation of the run, which closes its calls and
    leaves OUT with whole rows only; the pipeline then raises `RunInterrupted` with its
    summary, caught here inside the same task.
    """
    from langchain_moa.errors import RunInterrupted

    async def guarded() -> tuple[Any, bool]:
        try:
            return await run, False
        except RunInterrupted as exc:
            return exc.summary, True

    summary, interrupted = asyncio.run(guarded())
    code = _report(summary, output)
    if interrupted:
        err.print("moa: interrupted; run the same command again to finish", markup=False)
        return EXIT_INTERRUPTED
    return code


def check_label_flags(args: argparse.Namespace, defaults: Any) -> None:
    """Refuse flags that would be silently ignored (one line, exit 2)."""
    from langchain_moa.data import check_policy_options

    mode = args.mode or defaults.mode
    if args.swap is not None and mode != "pairwise":
        flag = "--swap" if args.swap else "--no-swap"
        why = f"--mode {mode}" if args.mode else f"the recipe judges {mode} by default"
        raise ConfigError(
            f"{flag} only applies to pairwise judging ({why}); pass --mode pairwise or "
            f"leave out {flag}"
        )
    if mode == "likelihood":
        given_flags = [("--aggregate", args.aggregate), ("--criteria", args.criteria),
                       ("--scoring", args.scoring)]  # fmt: skip
        for flag, given in given_flags:
            if given:
                why = "--mode likelihood" if args.mode else "the recipe judges by likelihood"
                raise ConfigError(
                    f"{flag} needs written verdicts, and likelihood judging has none ({why}); "
                    f"pass --mode pointwise or pairwise, or leave out {flag}"
                )
    if args.samples is not None and not args.policy:
        raise ConfigError(
            "--samples needs --policy: without a policy the candidates are each row's "
            "'responses', so there is nothing to sample"
        )
    check_policy_options(bool(args.policy), temperature=args.policy_temperature, system=args.system)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrency", type=_positive, default=4, metavar="N", help="rows in flight (default: 4)"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="take only shard I of N (1-based; rows split by identity, each shard its own "
        "OUT; default: all rows)",
    )
    parser.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="answer every copy of a row whose content repeats (default: once, others reported)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload OUT as a dataset file when done (token: HF_TOKEN or `hf auth login`; "
        "default: no upload)",
    )


def register(sub: Any) -> None:
    """Add the data subcommands to the `moa` parser."""
    gen = sub.add_parser("generate", help="SFT data: the MoA answer for every prompt (TRL format)")
    gen.add_argument("input", help="JSONL file, or hf://datasets/OWNER/NAME/FILE.jsonl")
    gen.add_argument("output", help="JSONL file to append to (re-runs skip rows already there)")
    add_model_options(gen)
    add_sampling_options(gen, system=False)
    gen.add_argument(
        "--system", metavar="TEXT",
        help="a system message put first in every row's conversation that has none (a row "
        "with its own keeps it): the proposers and the aggregator see it, so the drafts and "
        "the answer follow it, and OUT records it; it is part of the row's content, so a "
        "rerun with another --system answers rows without an id again and reports those "
        "with one as changed (default: none)",
    )  # fmt: skip
    add_run_shape_options(gen)
    _add_run_options(gen)
    gen.set_defaults(func=cmd_generate)

    lab = sub.add_parser("label", help="DPO data: chosen/rejected pairs ranked by an MoA judge")
    lab.add_argument("input", help="JSONL file, or hf://datasets/OWNER/NAME/FILE.jsonl")
    lab.add_argument("output", help="JSONL file to append to (re-runs skip rows already there)")
    add_model_options(lab)
    # The judges' and aggregator's answers are verdicts: --max-tokens caps them, --seed
    # seeds them; their temperatures stay the recipe's (a judge should not be creative).
    add_sampling_options(lab, system=False, temperature=False)
    lab.add_argument(
        "--policy", metavar="MODEL",
        help="sample candidates from this model: 'local' or provider:model (default: none, "
        "rank each row's 'responses')",
    )  # fmt: skip
    lab.add_argument(
        "--samples",
        type=_positive,
        metavar="N",
        help="candidates sampled per prompt with --policy (default: the recipe's; local: 4, "
        "others: 5)",
    )
    lab.add_argument(
        "--temperature", type=_temperature, metavar="T", dest="policy_temperature",
        help="with --policy: the temperature, 0 to 2, every candidate is sampled at (each "
        "with its own seed); the judges keep the recipe's (default: spread from 0.6 to 1.2 "
        "across the samples)",
    )  # fmt: skip
    lab.add_argument(
        "--system", metavar="TEXT",
        help="with --policy: a system message put first in the conversation of every row "
        "the policy samples for that has none (rows with their own, or with 'responses', "
        "keep theirs): the policy answers under it, the judges see it as part of the "
        "conversation, the row's prompt records it (default: none)",
    )  # fmt: skip
    lab.add_argument(
        "--mode",
        choices=["pairwise", "pointwise", "likelihood"],
        help="judge pairs, rate each candidate alone, or score each by the judges' token "
        "probabilities of writing it (local models only) (default: the recipe's; local: "
        "likelihood, others: pairwise)",
    )
    lab.add_argument(
        "--scoring",
        choices=["verdict", "probability"],
        help="pairwise/pointwise: count the written verdicts, or read the judges' token "
        "probabilities at the verdict, P(A) vs P(B) or the expected rating, where the "
        "server returns them (default: the recipe's, verdict)",
    )
    lab.add_argument(
        "--swap",
        action=argparse.BooleanOptionalAction,
        help="pairwise only: judge each pair in both orders (default: the recipe's, on)",
    )
    lab.add_argument(
        "--aggregate",
        action=argparse.BooleanOptionalAction,
        help="let the aggregator re-judge with the verdicts in view (default: the recipe's; "
        "local: off, others: on)",
    )
    lab.add_argument(
        "--criteria", metavar="LIST",
        help="'dynamic' (written per prompt), or comma-separated criteria (default: none)",
    )  # fmt: skip
    _add_run_options(lab)
    lab.set_defaults(func=cmd_label)


__all__ = ["ConfigError", "build_policy", "register"]

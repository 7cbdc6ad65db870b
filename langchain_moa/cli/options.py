"""The CLI's argparse types, the option groups commands share, and what the flags mean.

`moa_kwargs_for` is the one place the flags meet the recipe (chat, serve, generate, label).
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_moa.errors import ConfigError


def build_chat_moa(args: argparse.Namespace) -> Any:
    """ChatMoA from --config/--recipe with --layers, --max-tokens and --temperature applied."""
    return chat_moa_for(model_source(args), args)[1]


def chat_moa_for(source: str, args: argparse.Namespace) -> tuple[str, Any]:
    """(name, ChatMoA) for one recipe name or config path, with the command's overrides."""
    from langchain_moa.chat_model import ChatMoA

    recipe, kwargs = moa_kwargs_for(source, args)
    return recipe.name, ChatMoA(**kwargs)


def moa_kwargs_for(source: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(recipe, ChatMoA keyword arguments) with every override the command has.

    The one place the flags meet the recipe (`chat`, `serve`, `generate`, `label`):
    ``--max-tokens`` caps every model, ``--seed S`` seeds proposer i with S + i - 1 and the
    aggregator with S, ``--layers``, ``--proposer-timeout``, ``--min-proposers`` replace the
    recipe's, ``--temperature`` is the aggregator's (proposers keep theirs).
    """
    from langchain_moa.recipes import load_recipe

    recipe = load_recipe(source)
    if getattr(args, "max_tokens", None) is not None:
        recipe = recipe.with_max_tokens(args.max_tokens)
    if getattr(args, "seed", None) is not None:
        recipe = _with_seed(recipe, args.seed)
    kwargs = recipe.chat_moa_kwargs()
    for flag in ("layers", "proposer_timeout", "min_proposers", "temperature"):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[flag] = None if value == float("inf") else value
    return recipe, kwargs


def _with_seed(recipe: Any, seed: int) -> Any:
    """Proposer i (from 1) gets seed + i - 1 (distinct drafts), the aggregator seed."""
    from langchain_moa.recipes import SEED_RANGE

    low, high = SEED_RANGE

    def nth(i: int) -> int:  # wraps inside the 64-bit range
        return (seed + i - low) % (high - low + 1) + low

    return recipe.model_copy(
        update={
            "proposers": [e.model_copy(update={"seed": nth(i)}) for i, e in
                          enumerate(recipe.proposers)],
            "aggregator": recipe.aggregator.model_copy(update={"seed": seed}),
        }
    )  # fmt: skip


def _integer(value: str, low: int, high: int | None = None, why: str = "") -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
    if high is not None and number > high:
        raise argparse.ArgumentTypeError(f"must be {why}, got {number}")
    return number


def _positive(value: str) -> int:
    return _integer(value, 1)


def _non_negative(value: str) -> int:
    return _integer(value, 0)


def _port(value: str) -> int:
    return _integer(value, 1, 65535, "a TCP port from 1 to 65535")


def _layers(value: str) -> int:
    """A layer count in the range config files allow (``--layers 100000`` is a typo)."""
    from langchain_moa.recipes import MAX_LAYERS, RANGES

    return _integer(value, 1, MAX_LAYERS, RANGES["layers"])


def _min_proposers(value: str) -> int:
    from langchain_moa.recipes import MAX_PROPOSERS, RANGES

    return _integer(value, 1, MAX_PROPOSERS, RANGES["min_proposers"])


def _proposer_timeout(value: str) -> float:
    """Seconds from MIN_TIMEOUT to MAX_TIMEOUT, or inf for no limit (as config files)."""
    from langchain_moa.recipes import MAX_TIMEOUT, MIN_TIMEOUT, RANGES

    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != float("inf") and not MIN_TIMEOUT <= number <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be {RANGES['proposer_timeout']}, got {value}")
    return number


def _seed(value: str) -> int:
    from langchain_moa.recipes import RANGES, SEED_RANGE

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not SEED_RANGE[0] <= number <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be {RANGES['seed']}, got {value}")
    return number


def add_run_shape_options(parser: argparse.ArgumentParser, *, each: str = "the recipe's") -> None:
    """--proposer-timeout / --min-proposers (chat, serve, generate)."""
    parser.add_argument(
        "--proposer-timeout", type=_proposer_timeout, metavar="S",
        help="seconds a proposer layer waits for its drafts; a draft not done by then is "
        f"left out (0.1 to 86400, or inf for no limit; default: {each}; local: 120)",
    )  # fmt: skip
    parser.add_argument(
        "--min-proposers", type=_min_proposers, metavar="N",
        help="drafts a layer needs to go on; fewer is an error (exit 1) instead of an answer "
        f"from fewer drafts (1 to 64, at most the proposers; default: {each}; local: 1)",
    )  # fmt: skip


def add_sampling_options(parser: argparse.ArgumentParser, *, system: bool = True,
                         temperature: bool = True) -> None:  # fmt: skip
    """--max-tokens / --temperature / --seed (/ --system), applied by `moa_kwargs_for`."""
    parser.add_argument(
        "--max-tokens", type=_positive, metavar="N",
        help="cap every model's answer (drafts and the final answer) at N tokens (default: "
        "the recipe's caps; local: 320 per draft, 512 for the answer)",
    )  # fmt: skip
    if temperature:
        parser.add_argument(
            "--temperature", type=_temperature, metavar="T",
            help="the aggregator's sampling temperature, 0 to 2, for the final answer; "
            "proposers keep theirs (default: the recipe's; local: 0.3)",
        )  # fmt: skip
    parser.add_argument(
        "--seed", type=_seed, metavar="S",
        help="sampling seed: proposer i gets S + i - 1 (distinct drafts), the aggregator S; "
        "repeatable answers where the server honours seeds (default: the recipe's; local: "
        "fixed per model)",
    )  # fmt: skip
    if system:
        parser.add_argument("--system", metavar="TEXT", help="a system message (default: none)")


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _temperature(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 <= number <= 2:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {value}")
    return number


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version('langchain-moa')} (langchain-moa)"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "(langchain-moa, not installed)"


def model_source(args: argparse.Namespace) -> str:
    """The recipe name or config path a command builds its MoA from (one, not both)."""
    if args.recipe and args.config:
        raise ConfigError(
            f"--recipe {args.recipe} and --config {args.config} both say which models to use; "
            "pass one of them"
        )
    return args.config or args.recipe or "local"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--recipe / --config / --layers, shared by every command that builds a MoA."""
    parser.add_argument(
        "--recipe", metavar="NAME", help="recipe name, see `moa recipes` (default: local)"
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help="TOML/YAML config file of models, instead of --recipe (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--layers", type=_layers, metavar="N",
        help="number of layers, 1 = the aggregator alone (default: the recipe's; local: 2)",
    )  # fmt: skip

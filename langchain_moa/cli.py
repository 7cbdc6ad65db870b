"""The `moa` command line: chat, pull the local model, list recipes, serve, make data.

Output contract, so the CLI composes with pipes and scripts:

- stdout carries only the answer (streamed), the labelled drafts of ``--show-proposals``
  and the JSON of ``--json`` (one line per turn). Everything else (spinner, prompts,
  ``--verbose`` reports, errors) goes to stderr, and the spinner runs only when stderr
  is a terminal.
- User mistakes (bad recipe, bad config, missing key, missing model) print one line,
  ``moa: error: ...``, on stderr and exit 2; runtime failures (too few proposers answered,
  provider errors) exit 1; Ctrl-C exits 130. No traceback unless ``--debug``. Every known
  secret (the models' keys, the variables a config names, credential-like environment
  variables) is removed from every line printed and every log record (`redaction`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from langchain_moa.calls import CallError
from langchain_moa.errors import ConfigError, MoAError
from langchain_moa.redaction import (
    install_log_redaction,
    one_line,
    register_secrets,
    run_error_line,
)

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------- models


def build_chat_moa(args: argparse.Namespace) -> Any:
    """ChatMoA from --config/--recipe with --layers and --max-tokens applied."""
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.recipes import load_recipe

    recipe = load_recipe(model_source(args))
    if getattr(args, "max_tokens", None) is not None:
        recipe = recipe.with_max_tokens(args.max_tokens)
    kwargs = recipe.chat_moa_kwargs()
    if getattr(args, "layers", None) is not None:
        kwargs["layers"] = args.layers
    return ChatMoA(**kwargs)


# ------------------------------------------------------------------------ output


class _Spinner:
    """A transient spinner on stderr while the proposers draft (terminal only).

    Rich's own ``Console.status`` replaces ``sys.stdout`` with a proxy into the stderr
    console while it runs. Rich consoles see through the proxy, but a plain ``print`` or
    ``sys.stdout.write`` made meanwhile (ours, or a library's) would move from a piped stdout
    to stderr. Here stdout is redirected only when it is the terminal too (then printing
    above the spinner keeps the screen clean); a piped stdout is never touched.
    """

    def __init__(self, text: str) -> None:
        self._live: Any = None
        if err.is_terminal:
            from rich.live import Live
            from rich.spinner import Spinner

            self._live = Live(
                Spinner("dots", text=text, style="status.spinner"),
                console=err,
                transient=True,
                refresh_per_second=12.5,
                redirect_stdout=out.is_terminal,
                redirect_stderr=False,
            )

    def __enter__(self) -> _Spinner:
        if self._live is not None:
            self._live.start()
        return self

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _draft_printer(console: Console) -> Any:
    """A tracer printing each proposer's draft on `console` as soon as it is done.

    Drafts are printed live (they reach us as child runs of ChatMoA) rather than from
    ``response_metadata["moa"]``, which only arrives with the last streamed chunk: that way
    they appear before the answer starts streaming. The label uses the model name the
    server reported, like the metadata does.
    """
    from langchain_core.tracers.base import BaseTracer

    lock = threading.Lock()

    def label(run: Any) -> tuple[str, int]:
        metadata = run.extra.get("metadata", {})
        return f"proposer {metadata.get('moa_proposer', 0) + 1}", metadata.get("moa_layer", 1)

    class DraftPrinter(BaseTracer):
        def _persist_run(self, run: Any) -> None:
            pass

        def _on_llm_end(self, run: Any) -> None:
            if "moa:proposer" not in (run.tags or []):
                return
            who, layer = label(run)
            generation = (run.outputs or {}).get("generations", [[{}]])[0][0]
            text = (generation.get("text") or "").strip()
            message = generation.get("message") or {}
            served = (
                (message.get("kwargs", {}) if isinstance(message, dict) else {})
                .get("response_metadata", {})
                .get("model_name")
            )
            model = served or run.extra.get("metadata", {}).get("ls_model_name") or run.name
            with lock:
                console.print(f"{who} ({model}) [layer {layer}]:", style="bold cyan", markup=False)
                console.print(text or "(empty answer: left out)", style="dim", markup=False)
                console.print()

        def _on_llm_error(self, run: Any) -> None:
            if "moa:proposer" not in (run.tags or []):
                return
            who, layer = label(run)
            with lock:
                console.print(
                    f"{who} [layer {layer}] failed: {run_error_line(run.error)}",
                    style="bold red",
                    markup=False,
                )

    return DraftPrinter()


def _message_json(message: Any, turn: int, sent: list[Any]) -> str:
    """One JSON line per turn: the final message, its metadata, and what was sent.

    ``input_messages`` (the conversation the MoA received) makes multi-turn runs checkable
    by scripts: turn N's input holds every earlier question and final answer.
    """
    payload = {
        "turn": turn,
        "messages_sent": len(sent),
        "input_messages": [{"role": m.type, "content": m.text} for m in sent],
        "content": message.content,
        "tool_calls": message.tool_calls,
        "usage_metadata": message.usage_metadata,
        "response_metadata": message.response_metadata,
    }
    return json.dumps(payload, ensure_ascii=False, default=str)


def _report_usage(message: Any) -> None:
    """--verbose: token totals over every call and each call's latency (stderr)."""
    usage = message.usage_metadata or {}
    meta = message.response_metadata.get("moa", {})
    err.print(
        f"usage: {usage.get('input_tokens', 0)} in + {usage.get('output_tokens', 0)} out = "
        f"{usage.get('total_tokens', 0)} tokens over all calls",
        style="dim",
        markup=False,
    )
    for layer in meta.get("layers", []):
        for p in layer["proposals"]:
            state = "ok" if not p["error"] else p["error"]
            tokens = (p.get("usage") or {}).get("output_tokens")
            extra = f", {tokens} tokens" if tokens is not None else ""
            err.print(
                f"  layer {layer['layer']} proposer {p['proposer'] + 1} ({p['model']}): "
                f"{p['latency_s']:.2f} s{extra}, {state}",
                style="dim",
                markup=False,
            )
    agg = meta.get("aggregator")
    if agg:
        err.print(
            f"  aggregator ({agg['model']}) [layer {len(meta.get('layers', [])) + 1}]: "
            f"{agg['latency_s']:.2f} s",
            style="dim",
            markup=False,
        )


def answer(moa: Any, history: list, args: argparse.Namespace, turn: int) -> Any:
    """One MoA turn: stream to stdout (or print JSON); returns the final message."""
    config: dict[str, Any] = {}
    if args.show_proposals:
        # with --json, stdout must stay one JSON document per line: drafts go to stderr
        config["callbacks"] = [_draft_printer(err if args.json else out)]
    with _Spinner("proposers are drafting...") as spinner:
        if args.json:
            message = moa.invoke(history, config)
            spinner.stop()
            print(_message_json(message, turn, history), flush=True)
            return message
        merged = None
        for chunk in moa.stream(history, config):
            if merged is None:
                spinner.stop()
                if args.show_proposals:
                    out.print("answer:", style="bold green")
            if isinstance(chunk.content, str) and chunk.content:
                sys.stdout.write(chunk.content)
                sys.stdout.flush()
            merged = chunk if merged is None else merged + chunk
        sys.stdout.write("\n")
        sys.stdout.flush()
        return merged


def cmd_chat(args: argparse.Namespace) -> int:
    """One question (streamed), or an interactive chat keeping the whole history."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    moa = build_chat_moa(args)
    history: list[Any] = [SystemMessage(args.system)] if args.system else []
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ConfigError("the prompt is empty; pass a question, or none for a chat")
        history.append(HumanMessage(args.prompt))
        message = answer(moa, history, args, 1)
        if args.verbose:
            _report_usage(message)
        return EXIT_OK
    # Lines, not a TTY-only prompt: `printf 'q1\nq2\n' | moa chat` is a scripted chat.
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("MoA chat: type a message; Ctrl-D, 'exit' or 'quit' to leave.", style="dim")
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
        try:
            message = answer(moa, history, args, turn)
        except Exception as exc:  # MoAError, provider errors (Ctrl-C still ends the chat)
            if not interactive or args.debug:
                raise
            # At a terminal a failed turn should not end the conversation: drop the
            # question (the history stays a valid alternation) and let the user retry.
            history.pop()
            turn -= 1
            err.print(f"moa: error: {_one_line(exc)}", style="red", markup=False)
            continue
        history.append(AIMessage(content=message.content))
        if args.verbose:
            _report_usage(message)
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch the bundled model once; later runs just print where it is."""
    from langchain_moa.local import pull_bundled_model

    with _Spinner("fetching SmolLM2-135M-Instruct (~98 MB)..."):
        path = pull_bundled_model(force=args.force)
    out.print(f"model ready: {path}", markup=False)
    return EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes: name, shape, models, description."""
    from langchain_moa.recipes import RECIPES

    for name, recipe in RECIPES.items():
        default = "default; " if name == "local" else ""
        out.print(
            f"{name} ({default}{recipe.layers} layers, {len(recipe.proposers)} proposers)",
            style="bold",
            markup=False,
        )
        out.print(f"  {recipe.description}", markup=False)
        models = list(dict.fromkeys(e.label for e in recipe.proposers))
        out.print(
            f"  proposers: {', '.join(models)}; aggregator: {recipe.aggregator.label}",
            style="dim",
            markup=False,
        )
    out.print(
        "Also: --config FILE.toml|.yaml for any OpenAI-compatible endpoints (docs/recipes.md).",
        style="dim",
        markup=False,
    )
    return EXIT_OK


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_models(args: argparse.Namespace) -> dict[str, Any]:
    """One ChatMoA per --recipe / --config, keyed by the recipe's or the config's name."""
    from langchain_moa.chat_model import ChatMoA
    from langchain_moa.recipes import load_recipe

    sources = [*(args.recipe or []), *(args.config or [])] or ["local"]
    models: dict[str, Any] = {}
    for source in sources:
        recipe = load_recipe(source)
        if args.max_tokens is not None:
            recipe = recipe.with_max_tokens(args.max_tokens)
        kwargs = recipe.chat_moa_kwargs()
        if args.layers is not None:
            kwargs["layers"] = args.layers
        if recipe.name in models:
            raise ConfigError(
                f"two served MoAs are both named {recipe.name!r}; give one a different "
                "name = ... in its config file"
            )
        models[recipe.name] = ChatMoA(**kwargs)
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MoAs over HTTP: OpenAI-compatible API, LangServe at /moa, inspector at /."""
    try:
        import langserve  # noqa: F401  (the /moa routes are part of what `moa serve` serves)
        import uvicorn

        from langchain_moa.server import API_KEY_ENV, ServeLimits, create_app
    except ImportError:
        raise ConfigError(
            "serving needs the 'serve' extra: pip install 'langchain-moa[serve]'"
        ) from None
    api_key = os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None and not args.allow_public:
        raise ConfigError(
            f"refusing to serve on {args.host} without a key: set {API_KEY_ENV}, or pass "
            "--allow-public to serve it to anyone who can reach this machine"
        )
    if api_key is not None:
        register_secrets([api_key])
    models = served_models(args)
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
        max_runs=args.max_runs, max_queue=args.max_queue,
    )  # fmt: skip
    app = create_app(models, api_key=api_key, limits=limits)
    base = f"http://{args.host}:{args.port}"
    err.print(
        f"serving {', '.join(models)} at {base}/v1 (OpenAI API), {base}/moa (LangServe: "
        f"invoke, stream, batch, playground), inspector at {base}/"
        + (" (key required)" if api_key else ""),
        markup=False,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # configured by Config
        install_log_redaction(logging.getLogger(name))
    uvicorn.Server(config).run()
    return EXIT_OK


# ----------------------------------------------------------------------- parser


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
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
    parser.add_argument("--recipe", help="recipe name, see `moa recipes` (default: local)")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML/YAML config file of models (instead of --recipe)"
    )
    parser.add_argument(
        "--layers", type=_positive, help="override the number of layers (1 = aggregator alone)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa", description="Mixture-of-Agents for LangChain: chat, data, serving."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs (anywhere on the line)"
    )
    parser.add_argument("--version", action="version", version=f"moa {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `moa chat --debug` works like `moa --debug chat` (SUPPRESS: absent, the global stays)
    add_parser = sub.add_parser

    def add_command(*args: Any, **kwargs: Any) -> argparse.ArgumentParser:
        command = add_parser(*args, **kwargs)
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        return command

    sub.add_parser = add_command  # type: ignore[method-assign]

    chat = sub.add_parser(
        "chat",
        help="chat with a MoA (one prompt, or interactive)",
        description="Stream a MoA answer. Without PROMPT: an interactive chat keeping the "
        "history, reading lines from stdin (a pipe works); Ctrl-D, 'exit' or 'quit' leaves.",
    )
    chat.add_argument("prompt", nargs="?", help="the question; omit for an interactive chat")
    add_model_options(chat)
    chat.add_argument(
        "--max-tokens", type=_positive, metavar="N", help="cap every model's answer at N tokens"
    )
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument(
        "--show-proposals",
        action="store_true",
        help="print each draft as soon as it is done, labelled 'proposer i (model) [layer k]:', "
        "before the answer (on stderr with --json)",
    )
    chat.add_argument(
        "--json",
        action="store_true",
        help="print the full final message with metadata as one JSON line per turn",
    )
    chat.add_argument(
        "--verbose",
        action="store_true",
        help="usage totals and per-call latencies after each answer; debug logs (stderr)",
    )
    chat.set_defaults(func=cmd_chat)

    pull = sub.add_parser("pull", help="download the bundled local model (SmolLM2-135M)")
    pull.add_argument("--force", action="store_true", help="download again")
    pull.set_defaults(func=cmd_pull)

    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(func=cmd_recipes)

    serve = sub.add_parser(
        "serve", help="serve MoAs: OpenAI-compatible API, LangServe, inspector page"
    )
    serve.add_argument(
        "--recipe", action="append", metavar="NAME",
        help="serve this recipe as a model (repeatable; default: local)",
    )  # fmt: skip
    serve.add_argument(
        "--config", action="append", metavar="FILE",
        help="serve this config file as a model named by its 'name' (repeatable)",
    )  # fmt: skip
    serve.add_argument("--layers", type=_positive, help="override every MoA's number of layers")
    serve.add_argument("--max-tokens", type=_positive, metavar="N", help="cap every answer")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--allow-public", action="store_true",
        help="serve a non-loopback host without MOA_SERVE_API_KEY (anyone may use it)",
    )  # fmt: skip
    serve.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                       help="largest request body (default: 1000000)")  # fmt: skip
    serve.add_argument("--max-batch", type=_positive, default=32,
                       help="most inputs in one /moa/batch (default: 32)")  # fmt: skip
    serve.add_argument("--max-runs", type=_positive, default=16,
                       help="MoA runs in flight across the server (default: 16)")  # fmt: skip
    serve.add_argument("--max-queue", type=int, default=64,
                       help="runs that may wait for a slot before 429 (default: 64)")  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    # `generate` and `label` live in their own module; the CLI works without it.
    try:
        from langchain_moa import cli_data
    except ImportError:  # pragma: no cover - data commands ship with the package
        cli_data = None  # type: ignore[assignment]
    if cli_data is not None:
        cli_data.register(sub, add_model_options)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error as one redacted line (call errors already name the role and model)."""
    text = one_line(str(exc), limit=1000)
    if isinstance(exc, (ConfigError, MoAError, ValueError, FileNotFoundError, CallError)):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, code: int) -> int:
    err.print(f"moa: error: {message}", markup=False)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    if args.debug or getattr(args, "verbose", False):
        logging.getLogger("langchain_moa").setLevel(logging.DEBUG)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        err.print("moa: interrupted", markup=False)
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
        return _fail(_one_line(exc), EXIT_USER_ERROR)
    except MoAError as exc:
        if args.debug:
            raise
        return _fail(_one_line(exc), EXIT_RUNTIME_ERROR)
    except Exception as exc:  # provider/network failures: still one line
        if args.debug:
            raise
        return _fail(_one_line(exc), EXIT_RUNTIME_ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

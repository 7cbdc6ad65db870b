"""The `moa` command line: chat, pull the local model, list recipes, serve, make data.

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
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from langchain_moa.calls import CallError
from langchain_moa.errors import ConfigError, MoAError, install_command
from langchain_moa.redaction import (
    install_log_redaction,
    one_line,
    register_secrets,
)

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------- models


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


# ------------------------------------------------------------------------ output


class _Spinner:
    """A transient spinner on stderr while the models work (terminal only).

    It never redirects stdout (Rich's ``redirect_stdout`` would move a plain ``print`` from a
    piped stdout to stderr, and swallows blank lines): instead everything the CLI prints
    while a spinner may be up goes through `_TurnView`, which stops and clears the spinner
    first. It can be started again after (``start``/``stop`` pair up any number of times),
    and its text changed while it runs (``update``).
    """

    def __init__(self, text: str = "") -> None:
        self._text = text
        self._live: Any = None
        self._spinner: Any = None

    def start(self, text: str | None = None) -> None:
        if text is not None:
            self._text = text
        if self._live is not None or not err.is_terminal:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        self._spinner = Spinner("dots", text=self._text, style="status.spinner")
        self._live = Live(
            self._spinner,
            console=err,
            transient=True,
            refresh_per_second=12.5,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def update(self, text: str) -> None:
        self._text = text
        if self._spinner is not None:
            self._spinner.update(text=text)

    def stop(self) -> None:
        """Stop and erase the spinner line (a no-op when it is not running)."""
        live, self._live, self._spinner = self._live, None, None
        if live is not None:
            live.stop()

    def __enter__(self) -> _Spinner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _OpenLine:
    """Whether the streamed answer's last line on stdout is still open (no newline yet).

    A log record printed then would land in the middle of the answer's line when stdout
    and stderr are the same screen (a terminal, or ``2>&1``): `_LogHandler` ends the line
    on stderr first. Stdout itself never gets the extra newline (the answer stays as is).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open = False

    def wrote(self, text: str) -> None:
        with self.lock:
            self.open = not text.endswith("\n")


stdout_line = _OpenLine()


def _same_destination(a: Any, b: Any) -> bool:
    """True when two streams write to the same file, pipe or terminal."""
    try:
        x, y = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


class _LogHandler(logging.StreamHandler):
    """Log lines on stderr, each on its own line even in the middle of a streamed answer."""

    def emit(self, record: logging.LogRecord) -> None:
        with stdout_line.lock:
            if stdout_line.open and _same_destination(sys.stdout, self.stream):
                try:
                    sys.stdout.flush()  # the answer so far, then the line break after it
                    self.stream.write("\n")
                except (OSError, ValueError):  # pragma: no cover - a closed stream
                    pass
                stdout_line.open = False  # the answer goes on below the log line
            super().emit(record)


class _TurnView:
    """What one chat turn shows, in order: spinner, drafts, then the streamed answer.

    Drafts come from the package's call observer (`calls.observe` + `engine.proposal_of`):
    each is printed the moment its call finishes, before the aggregator starts. The
    observer may run on worker threads (sync path) or in the event loop (async path), so
    every write goes through one lock, and the spinner is stopped and erased before
    anything is printed (then started again below it while the others are still working).
    Drafts that finish after the answer started (stragglers of a closed layer) are not
    printed: they would land in the middle of the answer.
    """

    def __init__(self, moa: Any, args: argparse.Namespace) -> None:
        self._lock = threading.Lock()
        self._spinner = _Spinner()
        self._drafts: Console | None = None
        if args.show_proposals:
            # --json: stdout is JSON only; the human-readable drafts go to stderr.
            self._drafts = err if args.json else out
        self._json = bool(args.json)
        n_proposers = len(getattr(moa, "proposers", ()) or ())
        layers = getattr(moa, "layers", 2) or 1
        self._total = n_proposers * max(layers - 1, 0)
        self._done: set[tuple[int, int]] = set()
        self.answering = False
        self.closed = False

    def _status(self) -> str:
        done = min(len(self._done), self._total)
        if done >= self._total:
            return "the aggregator is writing the answer..."
        return f"proposers are drafting... ({done} of {self._total} drafts done)"

    def begin(self) -> None:
        with self._lock:
            self._spinner.start(self._status())

    def on_call(self, result: Any) -> None:
        """`calls.observe` callback: count the draft, print it with --show-proposals."""
        from langchain_moa.engine import proposal_of

        proposal = proposal_of(result)
        if proposal is None:
            return
        with self._lock:
            if self.answering or self.closed:
                return
            self._done.add((proposal.layer, proposal.proposer))
            if self._drafts is None:
                self._spinner.update(self._status())
                return
            self._spinner.stop()
            self._print_draft(self._drafts, proposal)
            self._spinner.start(self._status())

    @staticmethod
    def _print_draft(console: Console, p: Any) -> None:
        head = f"{p.label} [layer {p.layer}]"
        if p.ok:
            console.print(f"{head}:", style="bold cyan", markup=False)
            console.print(p.answer, style="dim", markup=False)
        elif p.error == "empty answer":
            console.print(f"{head}:", style="bold cyan", markup=False)
            console.print("(empty answer: left out)", style="dim", markup=False)
        elif p.dropped:
            console.print(f"{head} left out: {p.error}", style="yellow", markup=False)
        else:
            console.print(f"{head} failed: {p.error}", style="bold red", markup=False)
        console.print()  # a blank line between drafts, and before the answer

    def answer_starts(self) -> None:
        with self._lock:
            self._spinner.stop()
            self.answering = True
            if self._drafts is out:
                out.print("answer:", style="bold green", markup=False)

    def write(self, text: str) -> None:
        if text:
            with stdout_line.lock:
                sys.stdout.write(text)
                sys.stdout.flush()
                stdout_line.wrote(text)

    def close(self) -> None:
        """Stop the spinner; end a partly streamed answer's line (cancelled turns)."""
        with self._lock:
            self._spinner.stop()
            self.closed = True
            if self.answering and not self._json:
                with stdout_line.lock:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    stdout_line.wrote("\n")
                self.answering = False


def _message_json(message: Any, turn: int, sent: list[Any]) -> str:
    """One JSON line per turn: the final message, its metadata, and what was sent.

    ``input_messages`` (the conversation the MoA received) makes multi-turn runs checkable
    by scripts: turn N's input holds every earlier question and final answer. Drafts are
    in ``response_metadata.moa.layers``, where ``proposer`` is the 0-based index into the
    proposers list (people-facing text says "proposer N", counting from 1).
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
        tokens = (agg.get("usage") or {}).get("output_tokens")
        extra = f", {tokens} tokens" if tokens is not None else ""
        finish = message.response_metadata.get("finish_reason")
        err.print(
            f"  aggregator ({agg['model']}) [layer {len(meta.get('layers', [])) + 1}]: "
            f"{agg['latency_s']:.2f} s{extra}" + (f", finish_reason {finish}" if finish else ""),
            style="dim",
            markup=False,
        )


def _cut_off_hint(message: Any, args: argparse.Namespace) -> None:
    """One line on stderr when the answer stopped at the token limit, naming --max-tokens."""
    if message is None or message.response_metadata.get("finish_reason") != "length":
        return
    agg = message.response_metadata.get("moa", {}).get("aggregator") or {}
    limit = args.max_tokens or (agg.get("usage") or {}).get("output_tokens")
    at = f" ({limit} tokens)" if limit else ""
    more = max(2 * limit, 256) if limit else "N"
    err.print(
        f"moa: the answer was cut off at the token limit{at}; pass --max-tokens {more} "
        "for longer answers",
        style="yellow",
        markup=False,
    )


class TurnCancelled(Exception):
    """Ctrl-C during a turn: the turn was cancelled, its calls closed."""


class _ChatSession:
    """Runs turns on ONE event loop for the whole session.

    ChatOpenAI's async HTTP client is bound to the first event loop that used it, so a
    loop per turn (``asyncio.run`` each time) would break the second turn. The async path
    is used because cancelling it closes the HTTP connections: the local llama.cpp server
    then stops decoding the abandoned answers, where sync worker threads would run on and
    keep its slots busy.

    During a turn, Ctrl-C cancels the turn's task (`TurnCancelled`); a second Ctrl-C
    while it is being cancelled interrupts for real (KeyboardInterrupt).
    """

    def __init__(self, moa: Any, args: argparse.Namespace) -> None:
        self.moa = moa
        self.args = args
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        loop = self.loop
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=2))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException:  # pragma: no cover - best effort at exit
            pass
        finally:
            loop.close()

    def ask(self, history: list[Any], turn: int) -> Any:
        """One turn: stream the answer (or print JSON); returns the final message."""
        view = _TurnView(self.moa, self.args)
        task = self.loop.create_task(self._turn(history, turn, view))
        restore = self._cancel_on_sigint(task)
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise TurnCancelled from None
        finally:
            restore()
            view.close()

    def _cancel_on_sigint(self, task: asyncio.Task) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        presses = 0

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal presses
            presses += 1
            if presses > 1:
                raise KeyboardInterrupt
            self.loop.call_soon_threadsafe(task.cancel)

        previous = signal.signal(signal.SIGINT, on_sigint)
        return lambda: signal.signal(signal.SIGINT, previous)

    async def _turn(self, history: list[Any], turn: int, view: _TurnView) -> Any:
        from langchain_moa import calls

        with calls.observe(view.on_call):
            view.begin()
            if self.args.json:
                message = await self.moa.ainvoke(history)
                view.close()
                print(_message_json(message, turn, history), flush=True)
                return message
            merged = None
            async for chunk in self.moa.astream(history):
                if merged is None:
                    view.answer_starts()
                if isinstance(chunk.content, str):
                    view.write(chunk.content)
                merged = chunk if merged is None else merged + chunk
            if merged is None:  # pragma: no cover - a stream always has a chunk
                view.answer_starts()
            view.close()
            return merged


def _after_turn(message: Any, args: argparse.Namespace) -> None:
    _cut_off_hint(message, args)
    if args.verbose:
        _report_usage(message)


class _LineReader:
    """Reads the user's lines: readline editing and history at a terminal, plain lines else.

    ``printf 'q1\\nq2\\n' | moa chat`` is a scripted chat (no prompt). At a terminal the
    standard library's `readline` (when importable) gives line editing, and the arrow keys
    recall earlier lines of this session (kept in memory only, never written to disk).
    readline is used only when stdout is the terminal too (its prompt is written to
    stdout), so with a redirected stdout (``moa chat --json > turns.jsonl``) the prompt goes
    to stderr and stdout stays JSON only.
    """

    PROMPT = "you> "

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty()
        self.readline: Any = None
        if self.interactive and sys.stdout.isatty():
            try:
                import readline
            except ImportError:  # pragma: no cover - e.g. Windows without pyreadline
                readline = None  # type: ignore[assignment]
            self.readline = readline

    def read(self) -> str | None:
        """The next line, or None at the end of input (Ctrl-D). Ctrl-C propagates."""
        if self.readline is not None:
            color = err.is_terminal and not os.environ.get("NO_COLOR")
            # \001 and \002 tell readline the escape codes take no room on the line
            prompt = f"\001\x1b[1;32m\002{self.PROMPT}\001\x1b[0m\002" if color else self.PROMPT
            try:
                return input(prompt)
            except EOFError:
                err.print()
                return None
        if self.interactive:
            err.print(self.PROMPT, end="", style="bold green", markup=False)
        line = sys.stdin.readline()
        return line if line else None


def cmd_chat(args: argparse.Namespace) -> int:
    """One question (streamed), or an interactive chat keeping the whole history."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    check_chat_flags(args)
    # checked before the models are built: building the local MoA starts llama.cpp
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("the prompt is empty; pass a question, or none for a chat")
    moa = build_chat_moa(args)
    history: list[Any] = [SystemMessage(args.system)] if args.system else []
    session = _ChatSession(moa, args)
    try:
        if args.prompt is not None:
            history.append(HumanMessage(args.prompt))
            try:
                message = session.ask(history, 1)
            except TurnCancelled:
                raise KeyboardInterrupt from None
            _after_turn(message, args)
            return EXIT_OK
        return _chat_loop(session, history, args, AIMessage, HumanMessage)
    finally:
        session.close()


def _chat_loop(
    session: _ChatSession, history: list[Any], args: argparse.Namespace, ai: Any, human: Any
) -> int:
    reader = _LineReader()
    interactive = reader.interactive
    if interactive:
        err.print(
            "MoA chat: type a message; Ctrl-C cancels an answer; Ctrl-D, 'exit' or 'quit' "
            "to leave.",
            style="dim",
            markup=False,
        )
    turn = 0
    while True:
        try:
            line = reader.read()
        except KeyboardInterrupt:
            if not interactive:
                raise
            err.print()  # Ctrl-C at the prompt: a fresh prompt
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("exit", "quit"):
            break
        turn += 1
        history.append(human(text))
        try:
            message = session.ask(history, turn)
        except TurnCancelled:
            history.pop()  # the unanswered question leaves the history
            turn -= 1
            if not interactive:
                raise KeyboardInterrupt from None
            err.print("(cancelled)", style="yellow", markup=False)
            continue
        except Exception as exc:  # MoAError, provider errors
            if not interactive or args.debug:
                raise
            # At a terminal a failed turn should not end the conversation: drop the
            # question (the history stays a valid alternation) and let the user retry.
            history.pop()
            turn -= 1
            err.print(f"moa: error: {_one_line(exc)}", style="red", markup=False)
            continue
        history.append(ai(content=message.content))
        _after_turn(message, args)
    return EXIT_OK


def check_chat_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations where one would silently lose (one line, exit 2)."""
    if args.show_proposals and args.layers == 1:
        raise ConfigError(
            "--show-proposals with --layers 1: a 1-layer MoA has no drafts (the aggregator "
            "answers alone); use --layers 2 or more, or leave out --show-proposals"
        )


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
    sources = [*(args.recipe or []), *(args.config or [])] or ["local"]
    models: dict[str, Any] = {}
    for source in sources:
        name, moa = chat_moa_for(source, args)
        if name in models:
            raise ConfigError(
                f"two served MoAs are both named {name!r}; give one a different "
                "name = ... in its config file"
            )
        models[name] = moa
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MoAs over HTTP: OpenAI-compatible API, LangServe at /moa, inspector at /."""
    try:
        import langserve  # noqa: F401  (the /moa routes are part of what `moa serve` serves)
        import uvicorn

        from langchain_moa.server import (
            API_KEY_ENV,
            MIN_SERVE_KEY,
            ServeLimits,
            create_app,
            local_run_bound,
        )
    except ImportError:
        raise ConfigError(
            f"serving needs the 'serve' extra: {install_command('serve')}"
        ) from None
    api_key = os.environ.get(API_KEY_ENV) or None
    public = not _is_loopback(args.host)
    if public and api_key is None and not args.allow_public:
        raise ConfigError(
            f"refusing to serve on {args.host} without a key: set {API_KEY_ENV}, or pass "
            "--allow-public to serve it to anyone who can reach this machine"
        )
    if public and api_key is not None and len(api_key) < MIN_SERVE_KEY:
        raise ConfigError(
            f"{API_KEY_ENV} is {len(api_key)} characters: a key for a public host needs at "
            f"least {MIN_SERVE_KEY} (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )
    if api_key is not None:
        register_secrets([api_key])
    listener = _listen(args.host, args.port)  # before the models load (seconds for local)
    try:
        models = served_models(args)
    except BaseException:
        listener.close()
        raise
    max_runs, why = args.max_runs, "--max-runs"
    if max_runs is None:
        max_runs, why = 16, "default"
        bound = local_run_bound(models)
        if bound is not None and bound[0] < max_runs:
            max_runs, why = bound
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
        max_runs=max_runs, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
    )  # fmt: skip
    app = create_app(models, api_key=api_key, limits=limits)
    base = f"http://{args.host}:{args.port}"
    err.print(
        f"serving {', '.join(models)} at {base}/v1 (OpenAI API), {base}/moa (LangServe: "
        f"invoke, stream, batch), inspector at {base}/" + (" (key required)" if api_key else ""),
        markup=False,
    )
    err.print(
        f"limits: {max_runs} run{'' if max_runs == 1 else 's'} at once ({why}), "
        f"{args.max_queue} queued, "
        f"{args.request_timeout:g} s per request",
        markup=False,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning",
        access_log=False,  # the app's own access log (langchain_moa.access) has one line each
        # connections beyond this get 503 before reaching the app; idle keep-alive
        # connections close after 5 s (slow bodies: the app's --body-timeout)
        limit_concurrency=args.max_connections, timeout_keep_alive=5,
    )  # fmt: skip
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # configured by Config
        install_log_redaction(logging.getLogger(name))
    logging.getLogger("langchain_moa.access").setLevel(logging.INFO)
    uvicorn.Server(config).run(sockets=[listener])
    return EXIT_OK


def _listen(host: str, port: int) -> Any:
    """The server's listening socket, bound now: a port in use or a host this machine does
    not have is a one-line user error (exit 2) before any model loads."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot serve on {host}:{port}: {why}; pass a free --port, or a --host this "
            "machine has"
        ) from None
    sock.set_inheritable(True)
    return sock


# ----------------------------------------------------------------------- parser


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

    chat = sub.add_parser(
        "chat",
        help="chat with a MoA (one prompt, or interactive)",
        description="Stream a MoA answer. Without PROMPT: an interactive chat keeping the "
        "history, reading lines from stdin (a pipe works); at a terminal the arrow keys edit "
        "and recall lines, Ctrl-C cancels the answer being written (the question is dropped), "
        "and Ctrl-D, 'exit' or 'quit' leaves.",
    )
    chat.add_argument("prompt", nargs="?", help="the question; omit for an interactive chat")
    add_model_options(chat)
    add_sampling_options(chat)
    add_run_shape_options(chat)
    chat.add_argument(
        "--show-proposals",
        action="store_true",
        help="print each draft as soon as it is done, labelled 'proposer N (model) [layer k]:' "
        "(N from 1), before the answer; with --json the drafts go to stderr, stdout stays JSON",
    )
    chat.add_argument(
        "--json",
        action="store_true",
        help="print only JSON on stdout: one line per turn with the final message, usage and "
        "metadata; the drafts are in response_metadata.moa.layers, where 'proposer' is the "
        "0-based index into the proposers list (text output says 'proposer N' from 1)",
    )
    chat.add_argument(
        "--verbose",
        action="store_true",
        help="usage totals and per-call latencies after each answer; debug logs (stderr)",
    )
    chat.set_defaults(func=cmd_chat)

    pull = sub.add_parser("pull", help="download the bundled local model (SmolLM2-135M)")
    pull.add_argument("--force", action="store_true", help="download again even if cached")
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
        help="serve this config file as a model named by its 'name' (repeatable; default: none)",
    )  # fmt: skip
    serve.add_argument(
        "--layers", type=_layers, metavar="N",
        help="every MoA's number of layers (default: each recipe's)",
    )  # fmt: skip
    serve.add_argument(
        "--max-tokens", type=_positive, metavar="N",
        help="cap every model's answer at N tokens (default: each recipe's caps)",
    )  # fmt: skip
    serve.add_argument(
        "--temperature", type=_temperature, metavar="T",
        help="the aggregators' temperature when a request sets none (default: each recipe's)",
    )  # fmt: skip
    add_run_shape_options(serve, each="each recipe's")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, metavar="N",
                       help="TCP port, 1 to 65535; checked free before the models load "
                       "(default: 8000)")  # fmt: skip
    serve.add_argument(
        "--allow-public", action="store_true",
        help="serve a non-loopback host without MOA_SERVE_API_KEY, so anyone may use it "
        "(default: refused)",
    )  # fmt: skip
    serve.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                       help="largest request body (default: 1000000)")  # fmt: skip
    serve.add_argument("--max-batch", type=_positive, default=32,
                       help="most inputs in one /moa/batch (default: 32)")  # fmt: skip
    serve.add_argument("--max-runs", type=_positive, default=None,
                       help="MoA runs in flight across the server (default: 16, or what the "
                       "embedded local model's slots can serve)")  # fmt: skip
    serve.add_argument("--max-queue", type=_non_negative, default=64,
                       help="runs that may wait for a slot before 429 (default: 64)")  # fmt: skip
    serve.add_argument("--request-timeout", type=_seconds, default=300, metavar="S",
                       help="deadline of one request, queue included; past it the run stops "
                       "and the client gets 504 (default: 300)")  # fmt: skip
    serve.add_argument("--body-timeout", type=_seconds, default=30, metavar="S",
                       help="time a client has to send its request body; 408 after "
                       "(default: 30)")  # fmt: skip
    serve.add_argument("--max-connections", type=_positive, default=1000, metavar="N",
                       help="open connections before uvicorn answers 503 "
                       "(default: 1000)")  # fmt: skip
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

"""`moa chat`: one streamed question, or an interactive chat (see `langchain_moa.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console

from langchain_moa.cli import output
from langchain_moa.cli.options import (
    add_model_options,
    add_run_shape_options,
    add_sampling_options,
    chat_moa_for,
    model_source,
)
from langchain_moa.cli.output import EXIT_OK, _one_line, _Spinner, stdout_line
from langchain_moa.errors import ConfigError


def build_chat_moa(args: argparse.Namespace) -> Any:
    """ChatMoA from --config/--recipe with --layers, --max-tokens and --temperature applied."""
    return chat_moa_for(model_source(args), args)[1]


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
            self._drafts = output.err if args.json else output.out
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
            if self._drafts is output.out:
                output.out.print("answer:", style="bold green", markup=False)

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
    output.err.print(
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
            output.err.print(
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
        output.err.print(
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
    output.err.print(
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
            color = output.err.is_terminal and not os.environ.get("NO_COLOR")
            # \001 and \002 tell readline the escape codes take no room on the line
            prompt = f"\001\x1b[1;32m\002{self.PROMPT}\001\x1b[0m\002" if color else self.PROMPT
            try:
                return input(prompt)
            except EOFError:
                output.err.print()
                return None
        if self.interactive:
            output.err.print(self.PROMPT, end="", style="bold green", markup=False)
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
        output.err.print(
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
            output.err.print()  # Ctrl-C at the prompt: a fresh prompt
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
            output.err.print("(cancelled)", style="yellow", markup=False)
            continue
        except Exception as exc:  # MoAError, provider errors
            if not interactive or args.debug:
                raise
            # At a terminal a failed turn should not end the conversation: drop the
            # question (the history stays a valid alternation) and let the user retry.
            history.pop()
            turn -= 1
            output.err.print(f"moa: error: {_one_line(exc)}", style="red", markup=False)
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


def register(sub: Any) -> None:
    """Add `moa chat` to the `moa` parser."""
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

"""`moa chat` at a real terminal: a pseudo-terminal (pexpect) rendered by an emulator (pyte).

What a person sees is what is asserted: the bytes the CLI writes to its pty (stdout and
stderr both) are fed to a terminal emulator, and the checks read the rendered screen, so
cursor movements, erased spinner lines and blank lines count the way they do on a screen.

The models are the scripted OpenAI-compatible server on 127.0.0.1 (deterministic drafts,
answer pace and ``finish_reason``), reached through a ``--config`` file exactly as a user's
endpoints would be; one test runs the embedded SmolLM2 (marker ``local_model``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
pyte = pytest.importorskip("pyte")

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer  # noqa: E402
from tests.support import interruptible  # noqa: E402

pytestmark = pytest.mark.http

ROWS, COLS = 200, 110
SPINNER = re.compile("[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]|drafting|writing the answer")
SLOW_ANSWER = " ".join(f"word{i}" for i in range(60))  # 60 tokens at 0.2 s: 12 s


def reply_for(body: dict) -> str:
    question = body["messages"][-1]["content"]
    if "slow" in question:
        return SLOW_ANSWER
    return f"Answer to: {question}"


@pytest.fixture(scope="module")
def server():
    scripts = {
        "alpha": ModelScript(reply="First draft line.\nSecond draft line.", latency=0.3),
        "beta": ModelScript(reply="Another draft.", latency=0.6),
        "agg": ModelScript(reply=reply_for, token_delay=0.2),
    }
    with ScriptedOpenAIServer(scripts) as srv:
        yield srv


@pytest.fixture
def config(server, tmp_path: Path) -> Path:
    path = tmp_path / "scripted.toml"
    entry = f'base_url = "{server.base_url}"\n'
    path.write_text(
        'name = "scripted"\nlayers = 2\n'
        f'[[proposers]]\nmodel = "alpha"\n{entry}'
        f'[[proposers]]\nmodel = "beta"\n{entry}'
        f'[aggregator]\nmodel = "agg"\n{entry}'
    )
    server.reset()
    return path


class Terminal:
    """`moa` in a pty; `screen()` renders everything it wrote so far."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
        env.update(TERM="xterm-256color", PYTHONIOENCODING="utf-8")
        self.raw = bytearray()
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "langchain_moa.cli", *args],
            env=env,
            dimensions=(ROWS, COLS),
            timeout=60,
            preexec_fn=interruptible,
        )

    def expect(self, pattern: str | bytes, timeout: float = 60) -> None:
        if isinstance(pattern, str):
            pattern = re.escape(pattern.encode())
        try:
            self.child.expect(pattern, timeout=timeout)
        finally:
            self.raw += (self.child.before or b"") + (
                self.child.after if isinstance(self.child.after, bytes) else b""
            )

    def finish(self, timeout: float = 60) -> int:
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.raw += self.child.before or b""
        self.child.close()
        return self.child.exitstatus

    def send(self, text: str) -> None:
        self.child.send(text.encode())

    def wait_until_idle_at_the_prompt(self, timeout: float = 30) -> None:
        """Wait until the CLI's main thread sleeps in readline's wait for a key.

        CPython's readline checks for signals only when its ``select()`` is interrupted: a
        Ctrl-C that lands while it is still handling the previous key (after echoing it)
        waits for the next key. A person never types that fast; a test does. So the test
        presses Ctrl-C at an idle prompt, as a person would, instead of racing the echo.
        """
        wchan = Path(f"/proc/{self.child.pid}/wchan")
        if not wchan.exists():  # not Linux: a pause stands in for the check
            time.sleep(0.5)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(word in wchan.read_text() for word in ("poll", "select")):
                return
            time.sleep(0.02)
        raise AssertionError("the chat never went idle at its prompt")

    def screen(self) -> list[str]:
        screen = pyte.Screen(COLS, ROWS)
        pyte.ByteStream(screen).feed(bytes(self.raw))
        lines = [line.rstrip() for line in screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def spawn(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield spawn
    for term in opened:
        term.close()


def assert_no_spinner(lines: list[str]) -> None:
    residue = [line for line in lines if SPINNER.search(line)]
    assert not residue, "spinner left on screen:\n" + "\n".join(lines)


# ------------------------------------------------------------------------ one prompt


def test_drafts_then_answer_on_a_clean_screen(config: Path, terminal) -> None:
    term = terminal("chat", "--config", str(config), "--show-proposals", "What is MoA?")
    assert term.finish() == 0
    lines = term.screen()
    assert_no_spinner(lines)
    text = "\n".join(lines)
    # alpha answers first (0.3 s vs 0.6 s): drafts are printed as they finish
    assert text == (
        "proposer 1 (alpha) [layer 1]:\n"
        "First draft line.\n"
        "Second draft line.\n"
        "\n"
        "proposer 2 (beta) [layer 1]:\n"
        "Another draft.\n"
        "\n"
        "answer:\n"
        "Answer to: What is MoA?"
    ), text


def test_the_answer_streams_token_by_token(config: Path, terminal) -> None:
    term = terminal("chat", "--config", str(config), "please be slow")
    term.expect("word3 ")
    shown = time.monotonic()
    term.expect("word59")
    assert time.monotonic() - shown > 5  # the rest arrived afterwards, token by token
    assert term.finish() == 0
    screen = "".join(term.screen())  # the answer wraps at the screen's width
    assert screen == SLOW_ANSWER


def test_a_cut_off_answer_says_how_to_get_more(config: Path, terminal) -> None:
    term = terminal("chat", "--config", str(config), "--max-tokens", "5", "please be slow")
    assert term.finish() == 0
    lines = term.screen()
    assert_no_spinner(lines)
    assert lines[0] == "word0 word1 word2 word3 word4"
    assert lines[1] == (
        "moa: the answer was cut off at the token limit (5 tokens); pass --max-tokens 256 for "
        "longer answers"
    )


# ---------------------------------------------------------------------- interactive


def test_ctrl_c_cancels_the_answer_and_the_chat_goes_on(config: Path, server, terminal) -> None:
    term = terminal("chat", "--config", str(config), "--show-proposals")
    term.expect("you> ")
    term.send("please be slow\r")
    term.expect("word2 ")  # the answer is streaming
    term.child.sendintr()
    term.expect("(cancelled)", timeout=15)
    term.expect("you> ", timeout=15)
    # the slow answer stopped: its stream connection was closed, no more words arrive
    time.sleep(0.6)
    term.send("and now?\r")
    term.expect("Answer to: and now?")
    term.expect("you> ")
    term.send("exit\r")
    assert term.finish() == 0
    lines = term.screen()
    assert_no_spinner(lines)
    assert "word59" not in "\n".join(lines)
    cancelled = lines.index("(cancelled)")
    assert lines[cancelled - 1].startswith("word0 word1 word2")
    assert lines[cancelled + 1] == "you> and now?"
    # the cancelled question left the history: the next request never mentions it
    last = server.requests_for("agg")[-1]
    assert "please be slow" not in str(last.messages)
    assert last.messages[-1]["content"] == "and now?"


def test_ctrl_c_at_the_prompt_gives_a_fresh_prompt(config: Path, terminal) -> None:
    term = terminal("chat", "--config", str(config))
    term.expect("you> ")
    term.send("half a thou")
    term.expect("half a thou")  # echoed by readline (a tty drops unread input on Ctrl-C)
    term.wait_until_idle_at_the_prompt()
    term.child.sendintr()
    term.expect("you> ")
    term.send("hello\r")
    term.expect("Answer to: hello")
    term.expect("you> ")
    term.child.sendeof()  # Ctrl-D leaves
    assert term.finish() == 0
    lines = term.screen()
    assert "you> half a thou" in lines and "you> hello" in lines
    assert "Answer to: half a thou" not in "\n".join(lines)


def test_arrow_keys_edit_and_recall_lines(config: Path, terminal) -> None:
    term = terminal("chat", "--config", str(config))
    term.expect("you> ")
    term.send("hello\r")
    term.expect("Answer to: hello")
    term.expect("you> ")
    term.send("\x1b[A")  # up: recalls "hello"
    term.send("\x1b[D\x1b[D\x1b[D\x1b[DX")  # left x4, then type: "hXello"
    term.send("\r")
    term.expect("Answer to: hXello")
    term.expect("you> ")
    term.send("quit\r")
    assert term.finish() == 0
    text = "\n".join(term.screen())
    assert "^[[" not in text and "you> hXello" in text


# --------------------------------------------------------------- the embedded model


@pytest.mark.local_model
def test_quickstart_on_the_embedded_model(terminal) -> None:
    from langchain_moa.local import pull_bundled_model

    pull_bundled_model()
    term = terminal(
        "chat", "--show-proposals", "--max-tokens", "24", "Give me three tips for writing "
        "clear commit messages."
    )  # fmt: skip
    assert term.finish(timeout=240) == 0
    lines = term.screen()
    assert_no_spinner(lines)
    text = "\n".join(lines)
    heads = [f"proposer {i} (smollm2-135m-instruct) [layer 1]:" for i in (1, 2, 3)]
    for head in heads:
        assert text.count(head) == 1, text
        # every draft after the first starts after a blank line
        at = lines.index(head)
        assert at == 0 or lines[at - 1] == "", text
    answer = lines.index("answer:")
    assert lines[answer - 1] == "" and lines[answer + 1].strip(), text
    assert "--max-tokens" in lines[-1]  # 24 tokens cut the answer off: the hint says so

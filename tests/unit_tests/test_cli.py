"""The `moa` CLI with fake models: output, JSON, drafts, interactive history, errors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from rich.console import Console

from langchain_moa import ChatMoA, cli, errors
from langchain_moa.errors import ConfigError
from langchain_moa.testing import ScriptedChatModel

CONFIG = """
layers = 3
[[proposers]]
model = "p1"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "CLI_TEST_KEY"
max_tokens = 500
[[proposers]]
model = "p2"
base_url = "http://127.0.0.1:9/v1"
[aggregator]
model = "agg"
base_url = "http://127.0.0.1:9/v1"
"""


def make_moa(**kwargs) -> ChatMoA:
    def reply_with_turns(messages) -> str:
        return f"final after {len(messages)} messages"

    return ChatMoA(
        proposers=[
            ScriptedChatModel(model_name="alpha", reply="draft one"),
            ScriptedChatModel(model_name="beta", reply="draft two"),
        ],
        aggregator=ScriptedChatModel(model_name="agg", reply=reply_with_turns),
        **kwargs,
    )


@pytest.fixture
def fake_moa(monkeypatch) -> ChatMoA:
    """`moa chat` builds this instead of the recipe's models."""
    moa = make_moa()
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    return moa


def one_error_line(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moa: error: ") and "Traceback" not in captured.err
    return lines[0]


# ------------------------------------------------------------------------ parsing


def test_parser_defaults_and_options() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["chat", "hi"])
    assert (args.prompt, args.recipe, args.config, args.layers) == ("hi", None, None, None)
    assert not (args.show_proposals or args.json or args.verbose or args.debug)
    args = parser.parse_args(
        ["--debug", "chat", "--recipe", "together-moa", "--layers", "2", "--max-tokens", "9",
         "--show-proposals", "--json", "--verbose", "--system", "be brief"]
    )  # fmt: skip
    assert args.prompt is None and args.layers == 2 and args.max_tokens == 9 and args.debug
    assert args.system == "be brief" and args.show_proposals and args.json and args.verbose
    serve = parser.parse_args(["serve"])
    assert (serve.host, serve.port, serve.recipe) == ("127.0.0.1", 8000, None)  # None: local
    assert parser.parse_args(["pull", "--force"]).force
    assert {"generate", "label"} <= set(parser._subparsers._group_actions[0].choices)


@pytest.mark.parametrize(
    "argv", [["chat", "--layers", "0", "q"], ["chat", "--max-tokens", "x", "q"], ["nope"], []]
)
def test_bad_arguments_exit_2_with_usage(argv, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: moa" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "usage", "suggestion"),
    [
        (["chat", "--temprature", "0.2", "hi"], "usage: moa chat ", "'--temperature'"),
        (["serve", "--prot", "9"], "usage: moa serve ", "'--port'"),
        (["generate", "in", "out", "--concurency", "2"], "usage: moa generate ", "'--concurrency'"),
    ],
)
def test_a_misspelt_flag_names_the_subcommand_and_the_closest_option(
    argv, usage, suggestion, capsys
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "usage: moa [-h]" not in err
    last = err.strip().splitlines()[-1]
    flag = next(a for a in argv if a.startswith("--"))
    assert last.startswith(f"moa {argv[0]}: error: unrecognized arguments: {flag}")
    assert last.endswith(f"did you mean {suggestion}?")


def test_an_unknown_flag_with_nothing_close_gets_no_suggestion(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["chat", "--zzzzzz", "hi"])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "moa chat: error: unrecognized arguments: --zzzzzz"


@pytest.mark.parametrize("command", [["chat"], ["serve"]])
def test_a_layer_count_beyond_the_config_range_is_refused(command, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--layers", "100000"])
    assert info.value.code == 2
    assert "argument --layers: must be an integer from 1 to 10, got 100000" in (
        capsys.readouterr().err
    )


def test_build_chat_moa_applies_config_layers_and_max_tokens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-test-0123456789")
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    args = cli.build_parser().parse_args(["chat", "--config", str(path), "q"])
    moa = cli.chat.build_chat_moa(args)
    assert moa.layers == 3 and [m.model_name for m in moa.proposers] == ["p1", "p2"]
    assert moa.proposers[0].max_tokens == 500
    args = cli.build_parser().parse_args(
        ["chat", "--config", str(path), "--layers", "2", "--max-tokens", "7", "q"]
    )
    moa = cli.chat.build_chat_moa(args)
    assert moa.layers == 2
    assert all(
        isinstance(m, ChatOpenAI) and m.max_tokens == 7 for m in [*moa.proposers, moa.aggregator]
    )


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["generate", "in.jsonl", "out.jsonl"]])
def test_proposer_timeout_and_min_proposers_override_the_recipe(
    command, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-test-0123456789")
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    config = ["--config", str(path)]
    args = cli.build_parser().parse_args(
        [*command, *config, "--proposer-timeout", "2.5", "--min-proposers", "2"]
    )
    recipe, kwargs = cli.options.moa_kwargs_for(str(path), args)
    assert (recipe.proposer_timeout, recipe.min_proposers) == (None, 1)  # the file's
    assert (kwargs["proposer_timeout"], kwargs["min_proposers"]) == (2.5, 2)
    args = cli.build_parser().parse_args([*command, *config, "--proposer-timeout", "inf"])
    assert cli.options.moa_kwargs_for(str(path), args)[1]["proposer_timeout"] is None  # no limit


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--proposer-timeout", "0", "must be a number of seconds from 0.1 to 86400, or inf"),
        ("--proposer-timeout", "nan", "must be a number of seconds from 0.1 to 86400, or inf"),
        ("--proposer-timeout", "1e9", "must be a number of seconds from 0.1 to 86400, or inf"),
        ("--min-proposers", "0", "must be at least 1, got 0"),
        ("--min-proposers", "65", "must be an integer from 1 to 64, got 65"),
    ],
)
@pytest.mark.parametrize("command", ["chat", "serve"])
def test_run_shape_flags_take_the_config_files_ranges(command, flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_more_min_proposers_than_proposers_is_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-test-0123456789")
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    assert cli.main(["chat", "--config", str(path), "--min-proposers", "3", "q"]) == 2
    assert "min_proposers" in one_error_line(capsys.readouterr())


def test_generate_applies_the_same_sampling_flags_as_chat(tmp_path: Path, monkeypatch) -> None:
    from langchain_moa.cli import data as cli_data

    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-test-0123456789")
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    flags = ["--config", str(path), "--max-tokens", "9", "--temperature", "0.1", "--seed", "7"]
    gen = cli_data._recipe_models(cli.build_parser().parse_args(["generate", "i", "o", *flags]))
    assert gen["temperature"] == 0.1  # the aggregator's, as in chat
    assert [m.seed for m in gen["proposers"]] == [7, 8] and gen["aggregator"].seed == 7
    assert {m.max_tokens for m in [*gen["proposers"], gen["aggregator"]]} == {9}
    chat = cli.chat.build_chat_moa(cli.build_parser().parse_args(["chat", *flags, "q"]))
    assert chat.temperature == 0.1 and [m.seed for m in chat.proposers] == [7, 8]
    label = cli.build_parser().parse_args(["label", "i", "o", "--config", str(path),
                                           "--max-tokens", "9", "--seed", "7"])  # fmt: skip
    judges = cli_data._recipe_models(label)
    assert [m.seed for m in judges["proposers"]] == [7, 8]
    assert {m.max_tokens for m in [*judges["proposers"], judges["aggregator"]]} == {9}


def test_a_seed_outside_64_bits_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "i", "o", "--seed", str(2**63)])
    assert info.value.code == 2
    assert "argument --seed: must be a 64-bit integer" in capsys.readouterr().err


# ---------------------------------------------------------------------- answers


def test_chat_streams_the_answer(fake_moa, capsys) -> None:
    assert cli.main(["chat", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "final after 2 messages\n"
    assert captured.err == ""  # no spinner or noise when stderr is not a terminal


def test_chat_streams_chunk_by_chunk(monkeypatch) -> None:
    """The answer reaches stdout while the aggregator is still producing it."""
    moa = make_moa()
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    monkeypatch.setattr("sys.stdout", Recorder())
    assert cli.main(["chat", "hello"]) == 0
    # Word by word as the model sends them. (Only a tail that could begin a known key is
    # held back until the next chunk, e.g. the "s" of "messages" once some sk-... key is
    # registered in this process; words ending in a space never are.)
    assert writes[:3] == ["final ", "after ", "2 "]
    assert "".join(writes) == "final after 2 messages\n"


def test_system_message_goes_first(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--system", "be brief", "hello"]) == 0
    request = fake_moa.aggregator.calls[0]
    assert request[0].type == "system" and request[0].text.startswith("be brief")
    assert request[-1].text == "hello"


def test_chat_json_is_the_full_message(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--json", "hello"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["turn"] == 1 and payload["messages_sent"] == 1
    assert payload["input_messages"] == [{"role": "human", "content": "hello"}]
    assert payload["content"] == "final after 2 messages"
    assert payload["tool_calls"] == []
    meta = payload["response_metadata"]
    assert meta["model_name"] == "agg"
    proposals = meta["moa"]["layers"][0]["proposals"]
    assert [p["answer"] for p in proposals] == ["draft one", "draft two"]
    assert [p["model"] for p in proposals] == ["alpha", "beta"]
    assert meta["moa"]["aggregator"]["model"] == "agg"
    assert payload["usage_metadata"]["total_tokens"] == 45  # 3 calls x 15


def test_show_proposals_prints_each_draft_labelled_before_the_answer(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    text = capsys.readouterr().out
    assert "proposer 1 (alpha) [layer 1]:\ndraft one" in text
    assert "proposer 2 (beta) [layer 1]:\ndraft two" in text
    assert text.index("draft two") < text.index("answer:") < text.index("final after")


def test_show_proposals_labels_every_layer(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: make_moa(layers=3))
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    text = capsys.readouterr().out
    for layer in (1, 2):
        assert f"proposer 1 (alpha) [layer {layer}]:" in text
        assert f"proposer 2 (beta) [layer {layer}]:" in text


def test_show_proposals_reports_a_failed_draft(monkeypatch, capsys) -> None:
    moa = ChatMoA(
        proposers=[
            ScriptedChatModel(model_name="ok", reply="fine"),
            ScriptedChatModel(model_name="bad", fail_always=True),
        ],
        aggregator=ScriptedChatModel(reply="done"),
    )
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "--show-proposals", "q"]) == 0
    out = capsys.readouterr().out
    assert (
        "proposer 2 (bad) [layer 1] failed: RuntimeError: scripted failure\n\n" in out
        and out.rstrip().endswith("done")
    )


def test_json_with_show_proposals_keeps_stdout_pure_json(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--json", "--show-proposals", "hello"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["content"] == "final after 2 messages"
    assert "proposer 1 (alpha) [layer 1]:" in captured.err


def test_spinner_on_a_terminal_leaves_piped_stdout_alone(fake_moa, monkeypatch, capsys) -> None:
    """stderr is a terminal (spinner runs), stdout a pipe: stdout gets drafts and answer."""
    terminal = io.StringIO()
    terminal_err = Console(file=terminal, force_terminal=True, soft_wrap=True)
    monkeypatch.setattr(cli.output, "err", terminal_err)
    fake_moa.proposers[0].delay = 0.2  # the spinner is up while drafts are printed
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    out = capsys.readouterr().out
    assert "draft one" in out and "draft two" in out and "final after" in out
    assert "draft one" not in terminal.getvalue()
    assert "proposers are drafting" in terminal.getvalue()


def test_verbose_reports_usage_and_latencies(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--verbose", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "final after 2 messages\n"
    assert "usage: 30 in + 15 out = 45 tokens over all calls" in captured.err
    assert "layer 1 proposer 2 (beta):" in captured.err and "5 tokens, ok" in captured.err
    assert "aggregator (agg) [layer 2]:" in captured.err


# ------------------------------------------------------------------ interactive


CHATTY_RUN = textwrap.dedent(
    """
    import logging, sys
    from langchain_moa import ChatMoA, cli, errors
    from langchain_moa.testing import ScriptedChatModel

    class Chatty(ScriptedChatModel):
        async def _astream(self, messages, stop=None, run_manager=None, **kwargs):
            async for i, chunk in _enumerate(super()._astream(messages, stop, None, **kwargs)):
                if i == 2:  # a debug record in the middle of the streamed answer
                    logging.getLogger("langchain_moa.probe").debug("mid-answer note")
                yield chunk

    async def _enumerate(chunks):
        i = 0
        async for chunk in chunks:
            yield i, chunk
            i += 1

    moa = ChatMoA(aggregator=Chatty(reply="one two three four five"), layers=1)
    cli.chat.build_chat_moa = lambda args: moa
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def start_chatty(*argv: str, stderr: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", CHATTY_RUN, *argv],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def chatty_runs() -> dict[str, tuple[int, str, str | None]]:
    """`moa chat --verbose q` with stderr on stdout's pipe, and on a pipe of its own:
    (exit code, stdout, stderr). Both start together: each is mostly interpreter start-up."""
    runs = {
        "one pipe": start_chatty("chat", "--verbose", "q", stderr=subprocess.STDOUT),
        "two pipes": start_chatty("chat", "--verbose", "q", stderr=subprocess.PIPE),
    }
    done = {}
    try:
        for name, process in runs.items():
            out, err = process.communicate(timeout=60)
            done[name] = (process.returncode, out, err)
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def test_verbose_log_lines_never_land_inside_the_streamed_answer(chatty_runs) -> None:
    # stdout and stderr on one pipe, as on a terminal or with 2>&1
    returncode, stdout, _ = chatty_runs["one pipe"]
    assert returncode == 0, stdout
    lines = stdout.splitlines()
    assert "DEBUG langchain_moa.probe: mid-answer note" in lines, stdout
    words = " ".join(line for line in lines if not line.startswith(("DEBUG", "usage:", "  ")))
    assert words.split() == ["one", "two", "three", "four", "five"]


def test_the_answer_on_its_own_stdout_is_unchanged_by_log_lines(chatty_runs) -> None:
    returncode, stdout, stderr = chatty_runs["two pipes"]
    assert returncode == 0, stderr
    assert stdout == "one two three four five\n"
    assert "DEBUG langchain_moa.probe: mid-answer note" in stderr.splitlines()


def test_interactive_chat_keeps_history(fake_moa, monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("first question\n\n  \nsecond question\nexit\nignored\n")
    )
    assert cli.main(["chat", "--json"]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[1]["input_messages"] == [
        {"role": "human", "content": "first question"},
        {"role": "ai", "content": turns[0]["content"]},
        {"role": "human", "content": "second question"},
    ]
    # what the models actually received: the first Q/A before the second question
    second_request = fake_moa.aggregator.calls[1]
    texts = [m.text for m in second_request]
    assert texts[-3:] == ["first question", "final after 2 messages", "second question"]
    assert fake_moa.proposers[0].calls[1][-2].text == "final after 2 messages"
    assert len(fake_moa.aggregator.calls) == 2  # "ignored" after exit was never sent


@pytest.mark.parametrize("ending", ["", "quit\n", "QUIT\n", "exit\n"])
def test_interactive_chat_ends_on_eof_exit_or_quit(fake_moa, monkeypatch, capsys, ending) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n" + ending))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "final after 2 messages\n"


def test_interactive_streams_text_turn_after_turn(fake_moa, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "final after 2 messages\nfinal after 4 messages\n"


def test_piped_chat_stops_at_the_first_failed_turn(monkeypatch, capsys) -> None:
    moa = ChatMoA(
        proposers=[ScriptedChatModel(model_name="x", fail_always=True)],
        aggregator=ScriptedChatModel(),
    )
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert cli.main(["chat"]) == cli.EXIT_RUNTIME_ERROR
    assert "only 0 of 1 proposers answered" in one_error_line(capsys.readouterr())


def test_terminal_chat_survives_a_failed_turn(monkeypatch, capsys) -> None:
    proposer = ScriptedChatModel(model_name="x", fail_times=1, reply="draft")
    moa = ChatMoA(proposers=[proposer], aggregator=ScriptedChatModel(reply=lambda m: str(len(m))))

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    monkeypatch.setattr("sys.stdin", Tty("first\nsecond\n"))
    assert cli.main(["chat"]) == 0
    captured = capsys.readouterr()
    assert "moa: error: only 0 of 1 proposers answered" in captured.err
    # the failed question was dropped: the second request holds only "second"
    assert [m.text for m in moa.aggregator.calls[-1]][-1] == "second"
    assert captured.out.strip().endswith("2")  # system(references) + "second"


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["chat", "--recipe", "nope", "q"], "unknown recipe 'nope'"),
        (["chat", "--config", "/nonexistent.toml", "q"], "does not exist"),
        (["chat", "--recipe", "together-moa", "q"], "TOGETHER_API_KEY"),
        (["chat", "--recipe", "together-moa-lite", "--json", "q"], "TOGETHER_API_KEY"),
        (["chat", "  "], "the prompt is empty"),
        (["serve", "--recipe", "nope"], "unknown recipe 'nope'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, fragment, monkeypatch, capsys) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert fragment in one_error_line(captured) and captured.out == ""


@pytest.mark.parametrize("prompt", ["", "  ", "\n\t"])
def test_an_empty_prompt_is_refused_before_any_model_is_built(prompt, monkeypatch, capsys):
    """Building the default (local) MoA starts llama.cpp: a typo must not cost that."""
    built = []
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: built.append(args) or make_moa())
    assert cli.main(["chat", prompt]) == cli.EXIT_USER_ERROR
    assert "the prompt is empty" in one_error_line(capsys.readouterr())
    assert built == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("layers = = 2", "invalid TOML"),
        ("[aggregator]\nmodel = 'm'\n", "aggregator.base_url: missing"),
        ("[aggregator]\nmodel = 'm'\nbase_url='http://x'\nflavour = 1\n", "flavour: unknown"),
        ("layers = 'x'\n[aggregator]\nmodel='m'\nbase_url='http://x'\n", "layers: expected int"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text, fragment, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["chat", "--config", str(path), "q"]) == cli.EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr())
    assert str(path) in line and fragment in line


def test_missing_key_in_config_names_variable_and_model(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("CLI_TEST_KEY", raising=False)
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    assert cli.main(["chat", "--config", str(path), "q"]) == cli.EXIT_USER_ERROR
    line = one_error_line(capsys.readouterr())
    assert "proposer 1 (p1)" in line and "CLI_TEST_KEY" in line


def test_quorum_failure_is_a_one_line_runtime_error(monkeypatch, capsys) -> None:
    moa = ChatMoA(
        proposers=[ScriptedChatModel(model_name="x", fail_always=True)],
        aggregator=ScriptedChatModel(),
    )
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "q"]) == cli.EXIT_RUNTIME_ERROR
    assert one_error_line(capsys.readouterr()).startswith(
        "moa: error: only 0 of 1 proposers answered"
    )


@pytest.mark.parametrize(
    ("base_url", "shown"),
    [
        ("http://127.0.0.1:9/v1", "http://127.0.0.1:9"),
        ("http://user:pw-cli-secret@127.0.0.1:9/v1?api-key=q-cli-secret", "http://127.0.0.1:9"),
        ("http://[::1]:9/v1", "http://[::1]:9"),
    ],
)
def test_an_unreachable_endpoint_is_named_without_userinfo_or_query(
    base_url, shown, monkeypatch, capsys
) -> None:
    unreachable = ChatOpenAI(model="m", base_url=base_url, api_key="sk-unused", max_retries=0)
    moa = ChatMoA(proposers=[unreachable], aggregator=unreachable, layers=2)
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "q"]) == cli.EXIT_RUNTIME_ERROR
    line = one_error_line(capsys.readouterr())
    # the class is OpenAIConnectionError or APIConnectionError, by langchain-openai version
    assert re.search(
        rf"proposer 1 \(m\): \w*ConnectionError: Connection error\. "
        rf"\(could not reach {re.escape(shown)}\)$",
        line,
    )
    assert "cli-secret" not in line and "user" not in line and "/v1" not in line


def test_provider_errors_never_print_keys(monkeypatch, capsys) -> None:
    secret = "0123456789abcdef0123456789abcdef"  # no recognisable prefix
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", secret)
    failing = ScriptedChatModel(
        fail_always=True, error=RuntimeError(f"401: invalid key {secret}\nmore detail")
    )
    moa = ChatMoA(proposers=[ScriptedChatModel()], aggregator=failing)
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "q"]) == cli.EXIT_RUNTIME_ERROR
    captured = capsys.readouterr()
    line = one_error_line(captured)
    assert "RuntimeError: 401: invalid key ***" in line and secret not in captured.err


def test_debug_shows_the_traceback(monkeypatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        cli.main(["--debug", "chat", "--recipe", "together-moa", "q"])


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.chat, "build_chat_moa", interrupted)
    assert cli.main(["chat", "q"]) == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "moa: interrupted"


def test_missing_local_model_says_run_moa_pull(monkeypatch, tmp_path: Path, capsys) -> None:
    from langchain_moa import local

    monkeypatch.setattr(local, "_bundled_model", lambda: None)
    monkeypatch.delenv("MOA_LOCAL_MODEL", raising=False)
    assert cli.main(["chat", "--recipe", "local", "q"]) == cli.EXIT_USER_ERROR
    assert "run `moa pull`" in one_error_line(capsys.readouterr())


# ---------------------------------------------------------------- other commands


def test_serve_without_extra_says_what_to_install(monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_langserve(name, *args, **kwargs):
        if name == "langserve":
            raise ImportError("no langserve")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_langserve)
    monkeypatch.setattr(errors, "_editable_source", lambda: None)  # installed from PyPI
    assert cli.main(["serve"]) == cli.EXIT_USER_ERROR
    assert "pip install 'langchain-moa[serve]'" in one_error_line(capsys.readouterr())


class _Dist:
    def __init__(self, direct_url: str | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return self.direct_url if name == "direct_url.json" else None


@pytest.mark.parametrize(
    ("direct_url", "cwd_is_checkout", "expected"),
    [
        (None, False, "pip install 'langchain-moa[serve]'"),  # a wheel from an index
        ('{"url": "https://x/y.whl", "archive_info": {}}', False,
         "pip install 'langchain-moa[serve]'"),
        ('{"url": "file://CHECKOUT", "dir_info": {}}', True,
         "pip install 'langchain-moa[serve]'"),  # installed from a directory, not editable
        ('{"url": "file://CHECKOUT", "dir_info": {"editable": true}}', True,
         'pip install -e ".[serve]"'),
        ('{"url": "file://CHECKOUT", "dir_info": {"editable": true}}', False,
         'pip install -e "CHECKOUT[serve]"'),
    ],
)  # fmt: skip
def test_install_hints_match_how_the_package_was_installed(
    direct_url, cwd_is_checkout, expected, tmp_path, monkeypatch
) -> None:
    import importlib.metadata

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    text = direct_url.replace("CHECKOUT", str(checkout)) if direct_url else None
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Dist(text))
    monkeypatch.chdir(checkout if cwd_is_checkout else tmp_path)
    assert errors.install_command("serve") == expected.replace("CHECKOUT", str(checkout))


def test_recipes_lists_names_descriptions_and_models(capsys) -> None:
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "local (default; 2 layers, 3 proposers)" in out and "Self-MoA" in out
    assert "together-moa (3 layers" in out and "together-moa-lite (2 layers" in out
    assert "aggregator: Qwen/" in out


def test_pull_prints_where_the_model_is(monkeypatch, tmp_path: Path, capsys) -> None:
    from langchain_moa import local

    calls = []
    target = tmp_path / "model.gguf"
    monkeypatch.setattr(
        local, "pull_bundled_model", lambda force=False: calls.append(force) or target
    )
    assert cli.main(["pull"]) == 0 and cli.main(["pull", "--force"]) == 0
    assert calls == [False, True]
    assert capsys.readouterr().out.splitlines() == [f"model ready: {target}"] * 2


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip().startswith("moa 0.")


def test_recipe_and_config_together_are_refused(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[aggregator]\nprovider = "local"\n')
    code = cli.main(["chat", "hi", "--recipe", "local", "--config", str(cfg)])
    assert code == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr()) == (
        f"moa: error: --recipe local and --config {cfg} both say which models to use; "
        "pass one of them"
    )


def test_recipes_marks_the_default(capsys) -> None:
    assert cli.main(["recipes"]) == 0
    assert "local (default; 2 layers, 3 proposers)" in capsys.readouterr().out


# ------------------------------------------------------- a finished product (the issue)


def _options(parser):
    """(command, action) for every option of every subcommand, and the top level."""
    import argparse

    yield "moa", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_has_help_stating_its_default() -> None:
    import argparse

    parser = cli.build_parser()
    seen = 0
    for command, sub in _options(parser):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # --debug/--version repeated per command
                assert action.dest in ("debug", "version"), (command, action.dest)
                continue
            where = f"moa {command} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help"
            seen += 1
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction))
            if action.option_strings and not flag:
                assert "default" in action.help, f"{where}: help does not state the default"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert str(action.default) in action.help, f"{where}: default not in help"
    assert seen > 30


def test_help_states_the_local_recipes_real_defaults() -> None:
    from langchain_moa.recipes import RECIPES

    local = RECIPES["local"]
    chat = next(sub for name, sub in _options(cli.build_parser()) if name == "chat")
    helps = {a.dest: a.help for a in chat._actions}
    caps = {p.max_tokens for p in local.proposers}
    assert len(caps) == 1
    assert (
        f"local: {caps.pop()} per draft, {local.aggregator.max_tokens} for the answer"
        in (helps["max_tokens"])
    )
    assert f"local: {local.aggregator.temperature}" in helps["temperature"]
    assert f"local: {local.layers}" in helps["layers"]
    assert f"local: {local.min_proposers})" in helps["min_proposers"]
    assert f"local: {local.proposer_timeout:g})" in helps["proposer_timeout"]


@pytest.mark.parametrize("command", ["chat", "pull", "recipes", "serve", "generate", "label"])
def test_global_flags_work_on_every_subcommand(command, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("moa 0.")
    positional = ["in.jsonl", "out.jsonl"] if command in ("generate", "label") else []
    args = cli.build_parser().parse_args([command, *positional, "--debug"])
    assert args.debug
    args = cli.build_parser().parse_args(["--debug", command, *positional])
    assert args.debug


def test_temperature_is_the_aggregators(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CLI_TEST_KEY", "sk-cli-test-0123456789")
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG)
    args = cli.build_parser().parse_args(["chat", "--config", str(path), "--temperature", "0.2"])
    moa = cli.chat.build_chat_moa(args)
    assert moa.temperature == 0.2
    assert all(p.temperature != 0.2 for p in moa.proposers)
    serve = cli.build_parser().parse_args(["serve", "--config", str(path), "--temperature", "1"])
    (served,) = cli.serve.served_models(serve).values()
    assert served.temperature == 1.0


@pytest.mark.parametrize("value", ["-0.1", "2.5", "hot"])
def test_bad_temperature_is_a_usage_error(value, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["chat", "--temperature", value, "q"])
    assert info.value.code == 2
    assert "--temperature" in capsys.readouterr().err


class CutOffModel(ScriptedChatModel):
    """An aggregator whose answers stop at the token limit."""

    def _answer(self, messages, call_number, kwargs):
        message = super()._answer(messages, call_number, kwargs)
        metadata = {**message.response_metadata, "finish_reason": "length"}
        return message.model_copy(update={"response_metadata": metadata})


def cut_off_moa() -> ChatMoA:
    return ChatMoA(
        proposers=[ScriptedChatModel(model_name="alpha", reply="draft")],
        aggregator=CutOffModel(
            model_name="agg", reply="an answer that goes on and", output_tokens=7
        ),
    )


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_cut_off_answer_ends_with_a_hint_naming_max_tokens(json_flag, monkeypatch, capsys):
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: cut_off_moa())
    assert cli.main(["chat", *json_flag, "q"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "moa: the answer was cut off at the token limit (7 tokens); pass --max-tokens 256 "
        "for longer answers"
    )
    if json_flag:
        assert json.loads(captured.out)["response_metadata"]["finish_reason"] == "length"
    else:
        assert captured.out == "an answer that goes on and\n"


def test_the_hint_suggests_twice_the_limit_given(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: cut_off_moa())
    assert cli.main(["chat", "--max-tokens", "300", "q"]) == 0
    assert "(300 tokens); pass --max-tokens 600 for" in capsys.readouterr().err


def test_a_finished_answer_has_no_hint(fake_moa, capsys) -> None:
    assert cli.main(["chat", "q"]) == 0
    assert capsys.readouterr().err == ""


def test_json_show_proposals_several_turns_stdout_is_only_json(fake_moa, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert cli.main(["chat", "--json", "--show-proposals", "--verbose"]) == 0
    captured = capsys.readouterr()
    turns = [json.loads(line) for line in captured.out.splitlines()]  # every line is JSON
    assert [t["turn"] for t in turns] == [1, 2]
    # the drafts are inside the JSON, 0-based; people-facing stderr says proposer 1 and 2
    assert [
        p["proposer"] for p in turns[0]["response_metadata"]["moa"]["layers"][0]["proposals"]
    ] == [0, 1]
    assert captured.err.count("proposer 1 (alpha) [layer 1]:") == 2
    assert "proposer 2 (beta) [layer 1]:\ndraft two\n\n" in captured.err


def test_drafts_are_separated_by_blank_lines(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    assert sorted(blocks[:2]) == sorted(
        ["proposer 1 (alpha) [layer 1]:\ndraft one", "proposer 2 (beta) [layer 1]:\ndraft two"]
    )
    assert blocks[2] == "answer:\nfinal after 2 messages\n"


def test_the_spinner_is_down_whenever_anything_is_printed(fake_moa, monkeypatch) -> None:
    """The terminal case: the spinner is stopped (erased) before each draft and the answer."""
    terminal = io.StringIO()
    terminal_err = Console(file=terminal, force_terminal=True, soft_wrap=True)
    monkeypatch.setattr(cli.output, "err", terminal_err)
    fake_moa.proposers[0].delay = 0.3  # drafts arrive while the spinner runs
    state = {"up": False, "starts": 0}
    real_start, real_stop = cli.output._Spinner.start, cli.output._Spinner.stop

    def start(self, text=None):
        real_start(self, text)
        state["up"], state["starts"] = self._live is not None, state["starts"] + 1

    def stop(self):
        real_stop(self)
        state["up"] = False

    monkeypatch.setattr(cli.output._Spinner, "start", start)
    monkeypatch.setattr(cli.output._Spinner, "stop", stop)
    printed: list[tuple[bool, str]] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            printed.append((state["up"], text))
            return super().write(text)

    monkeypatch.setattr("sys.stdout", Recorder())
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    assert printed and not any(up for up, _ in printed), printed
    text = "".join(t for _, t in printed)
    assert "draft one" in text and "final after 2 messages" in text
    assert state["starts"] >= 3  # up again below each draft while the rest work
    assert "drafts done" in terminal.getvalue()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class CtrlCWhenAsked(ScriptedChatModel):
    """Presses Ctrl-C (SIGINT to this process) once its first request has arrived.

    The press lands while that request is in flight (its `delay` has begun), whatever the
    machine's speed: no timer racing the turn.
    """

    def _record(self, messages: list[Any], kwargs: dict[str, Any]) -> int:
        number = super()._record(messages, kwargs)
        if number == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return number


def test_ctrl_c_during_an_answer_cancels_only_that_turn(monkeypatch, capsys) -> None:
    # the first turn would take 30 s (the test would fail after them): Ctrl-C cancels it
    slow = CtrlCWhenAsked(model_name="slow", reply="draft", delay=30)
    moa = ChatMoA(proposers=[slow], aggregator=ScriptedChatModel(reply=lambda m: f"{len(m)}"))
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)

    class User(Tty):
        """Types "second" after the first turn was cancelled; it is answered at once."""

        def readline(self, *args: Any) -> str:
            line = super().readline(*args)
            if line == "second\n":
                slow.delay = 0
            return line

    monkeypatch.setattr("sys.stdin", User("first\nsecond\n"))
    original = signal.getsignal(signal.SIGINT)
    assert cli.main(["chat"]) == 0
    assert signal.getsignal(signal.SIGINT) is original  # the handler is restored
    captured = capsys.readouterr()
    assert "(cancelled)" in captured.err
    # the cancelled question is gone: the answered request holds only "second"
    assert len(moa.aggregator.calls) == 1
    assert [m.text for m in moa.aggregator.calls[0]][-1] == "second"
    assert [[m.text for m in call] for call in slow.calls] == [["first"], ["second"]]
    assert captured.out == "2\n"  # system(references) + "second"


def test_ctrl_c_at_the_prompt_gives_a_fresh_prompt(fake_moa, monkeypatch, capsys) -> None:
    lines = iter([KeyboardInterrupt, "hello", None])

    def read(self):
        item = next(lines)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr("sys.stdin", Tty(""))
    monkeypatch.setattr(cli.chat._LineReader, "read", read)
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "final after 2 messages\n"


def test_ctrl_c_in_a_piped_chat_or_one_question_exits_130(monkeypatch, capsys) -> None:
    slow = CtrlCWhenAsked(model_name="slow", reply="draft", delay=30)
    moa = ChatMoA(proposers=[slow], aggregator=ScriptedChatModel())
    monkeypatch.setattr(cli.chat, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "q"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "moa: interrupted"
    assert moa.aggregator.calls == []


def test_one_event_loop_for_the_whole_session(fake_moa, monkeypatch, capsys) -> None:
    """ChatOpenAI's async client is bound to its first loop: every turn must share one."""
    import asyncio

    loops = set()
    real = fake_moa.aggregator._astream

    async def recording(*args, **kwargs):
        loops.add(id(asyncio.get_running_loop()))
        async for chunk in real(*args, **kwargs):
            yield chunk

    object.__setattr__(fake_moa.aggregator, "_astream", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\nc\n"))
    assert cli.main(["chat"]) == 0
    assert len(fake_moa.aggregator.calls) == 3 and len(loops) == 1


def test_show_proposals_with_one_layer_is_refused(capsys) -> None:
    assert cli.main(["chat", "--show-proposals", "--layers", "1", "q"]) == cli.EXIT_USER_ERROR
    assert "a 1-layer MoA has no drafts" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--mode", "pointwise", "--swap"], "--swap only applies to pairwise judging"),
        (["--mode", "likelihood", "--no-swap"], "--no-swap only applies to pairwise judging (--m"),
        (["--samples", "3"], "--samples needs --policy"),
        (
            ["--mode", "likelihood", "--aggregate"],
            "--aggregate needs written verdicts, and likelihood judging has none",
        ),
        (["--mode", "likelihood", "--scoring", "probability"], "--scoring needs written verdicts"),
        (["--aggregate"], "--aggregate needs written verdicts, and likelihood judging has none"),
        (["--mode", "likelihood", "--criteria", "dynamic"], "--criteria needs written verdicts"),
        (
            ["--mode", "likelihood", "--recipe", "together-moa-lite"],
            "--mode likelihood reads llama.cpp grammars and token probabilities",
        ),
        (["--temperature", "0.5"], "--temperature needs --policy"),
        (["--system", "Be brief."], "--system needs --policy"),
        (["--policy", "local", "--system", " "], "--system is empty"),
    ],
)
def test_label_flags_that_would_be_ignored_are_refused(flags, fragment, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "q", "responses": ["a", "b"]}\n')
    argv = ["label", str(source), str(tmp_path / "out.jsonl"), *flags]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert fragment in one_error_line(capsys.readouterr())

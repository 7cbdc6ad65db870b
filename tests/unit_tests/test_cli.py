"""The `moa` CLI with fake models: output, JSON, drafts, interactive history, errors."""

from __future__ import annotations

import io
import json

import pytest

from langchain_moa import ChatMoA, cli
from langchain_moa.testing import ScriptedChatModel


@pytest.fixture
def fake_moa(monkeypatch) -> ChatMoA:
    def reply_with_turns(messages) -> str:
        return f"final after {len(messages)} messages"

    moa = ChatMoA(
        proposers=[
            ScriptedChatModel(model_name="alpha", reply="draft one"),
            ScriptedChatModel(model_name="beta", reply="draft two"),
        ],
        aggregator=ScriptedChatModel(model_name="agg", reply=reply_with_turns),
    )
    monkeypatch.setattr(cli, "build_chat_moa", lambda args: moa)
    return moa


def test_chat_streams_the_answer(fake_moa, capsys) -> None:
    assert cli.main(["chat", "hello"]) == 0
    assert capsys.readouterr().out.strip() == "final after 2 messages"


def test_chat_json_is_the_full_message(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--json", "hello"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["content"] == "final after 2 messages"
    proposals = payload["response_metadata"]["moa"]["layers"][0]["proposals"]
    assert [p["answer"] for p in proposals] == ["draft one", "draft two"]
    assert payload["usage_metadata"]["total_tokens"] == 45


def test_show_proposals_prints_each_draft_labelled(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--show-proposals", "hello"]) == 0
    text = capsys.readouterr().out
    assert "proposer 1 (alpha) [layer 1]:" in text and "draft one" in text
    assert "proposer 2 (beta) [layer 1]:" in text and "draft two" in text
    assert text.index("draft two") < text.index("final after")


def test_interactive_chat_keeps_history(fake_moa, monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("first question\nsecond question\nexit\nignored\n")
    )
    assert cli.main(["chat", "--json"]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    second_request = fake_moa.aggregator.calls[1]
    texts = [m.text for m in second_request]
    assert "first question" in texts[1]
    assert "final after 2 messages" in texts  # the first answer is in the history
    assert texts[-1] == "second question"


def test_verbose_reports_usage(fake_moa, capsys) -> None:
    assert cli.main(["chat", "--verbose", "hello"]) == 0
    assert "usage: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["chat", "--recipe", "nope", "q"], "unknown recipe 'nope'"),
        (["chat", "--config", "/nonexistent.toml", "q"], "does not exist"),
        (["chat", "--recipe", "together-moa", "q"], "TOGETHER_API_KEY"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, fragment, monkeypatch, capsys) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moa: error: ") and fragment in lines[0]
    assert "Traceback" not in captured.err


def test_quorum_failure_is_a_one_line_error(monkeypatch, capsys) -> None:
    moa = ChatMoA(
        proposers=[ScriptedChatModel(model_name="x", fail_always=True)],
        aggregator=ScriptedChatModel(),
    )
    monkeypatch.setattr(cli, "build_chat_moa", lambda args: moa)
    assert cli.main(["chat", "q"]) == cli.EXIT_RUNTIME_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("moa: error: only 0 of 1 proposers answered") and "\n" not in err


def test_serve_without_extra_says_what_to_install(monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_langserve(name, *args, **kwargs):
        if name == "langserve":
            raise ImportError("no langserve")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_langserve)
    assert cli.main(["serve"]) == cli.EXIT_USER_ERROR
    assert "pip install 'langchain-moa[serve]'" in capsys.readouterr().err


def test_recipes_lists_names(capsys) -> None:
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "local" in out and "together-moa-lite" in out

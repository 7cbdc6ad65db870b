"""Exactly-once pipeline runs in messy use: edited inputs, duplicates, a second run on the
same OUT, preconditions, the first-row probe, shards, progress, datasets-loadable output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import constants as hub_constants

from langchain_moa import ChatMoA, ConfigError
from langchain_moa.data import OutputBusy, RunStopped, content_id, generate, label
from langchain_moa.data.output import errors_path_for, lock_output
from langchain_moa.judge import MoAJudge
from langchain_moa.testing import ScriptedChatModel


def prompts(*texts: str) -> list[dict]:
    return [{"prompt": t} for t in texts]


class Recorder:
    """An MoA whose aggregator records every question it answered."""

    def __init__(self) -> None:
        self.aggregator = ScriptedChatModel(model_name="agg", reply=lambda m: "A: " + m[-1].text)
        self.moa = ChatMoA(
            proposers=[ScriptedChatModel(model_name="p", reply="draft")],
            aggregator=self.aggregator,
        )

    @property
    def answered(self) -> list[str]:
        return [messages[-1].text for messages in self.aggregator.calls]


def moa_failing_on(word: str, error: Exception) -> ChatMoA:
    """An MoA whose aggregator raises `error` on a question containing `word`."""

    def reply(messages):
        if word in messages[-1].text:
            raise error
        return "fine"

    return ChatMoA(
        proposers=[ScriptedChatModel(reply="draft")], aggregator=ScriptedChatModel(reply=reply)
    )


@pytest.fixture
def answered_in(read_jsonl) -> Callable[[Path], list[str]]:
    """``answered_in(out)``: the questions answered in OUT, in its order."""
    return lambda out: [row["messages"][-2]["content"] for row in read_jsonl(out)]


def check_adds_up(summary) -> None:
    parts = (
        summary.other_shards, summary.skipped, summary.written, summary.failed,
        summary.malformed, summary.duplicates, summary.not_attempted,
    )  # fmt: skip
    assert sum(parts) == summary.read, summary


# --------------------------------------------------------------------- identity


def test_editing_the_input_never_skips_or_repeats_a_prompt(
    tmp_path: Path, write_jsonl, answered_in
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("alpha", "beta", "gamma"))
    out = tmp_path / "out.jsonl"
    first = Recorder()
    generate(source, out, first.moa)
    # a new prompt at the top, one removed, one appended: line numbers all shift
    write_jsonl(source, prompts("new first", "alpha", "gamma", "appended"))
    second = Recorder()
    summary = generate(source, out, second.moa)
    assert sorted(second.answered) == ["appended", "new first"]
    assert (summary.read, summary.skipped, summary.written) == (4, 2, 2)
    check_adds_up(summary)
    assert sorted(answered_in(out)) == ["alpha", "appended", "beta", "gamma", "new first"]


def test_same_prompt_as_string_or_messages_is_one_row(tmp_path: Path, write_jsonl) -> None:
    one = [{"role": "user", "content": "hi"}]
    assert content_id(one) == content_id([{"content": "hi", "role": "user"}])
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}, {"messages": one}])
    summary = generate(source, tmp_path / "out.jsonl", Recorder().moa)
    assert (summary.written, summary.duplicates) == (1, 1)


def test_label_identity_includes_the_responses(tmp_path: Path, write_jsonl) -> None:
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")], swap=False)
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "q", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["c", "d"]}],
    )
    summary = label(source, tmp_path / "out.jsonl", judge)
    assert (summary.written, summary.duplicates) == (2, 0)


def test_duplicates_are_reported_unless_kept(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("same", "other", "same", "same"))
    recorder = Recorder()
    out = tmp_path / "out.jsonl"
    summary = generate(source, out, recorder.moa)
    assert sorted(recorder.answered) == ["other", "same"]
    assert (summary.written, summary.duplicates, summary.failed) == (2, 2, 0)
    assert summary.ok  # reported, not a failure
    check_adds_up(summary)
    errors = read_jsonl(errors_path_for(out))
    assert [(e["line"], e["kind"]) for e in errors] == [(3, "duplicate"), (4, "duplicate")]
    assert (
        "same content as line 1" in errors[0]["reason"]
        and "--keep-duplicates" in errors[0]["reason"]
    )

    kept = tmp_path / "kept.jsonl"
    again = Recorder()
    summary = generate(source, kept, again.moa, keep_duplicates=True)
    assert sorted(again.answered) == ["other", "same", "same", "same"]
    base = content_id([{"role": "user", "content": "same"}])
    assert sorted(r["id"] for r in read_jsonl(kept) if r["id"].startswith(base)) == [
        base, base + "#2", base + "#3",
    ]  # fmt: skip
    # a rerun keeps each copy exactly once
    rerun = Recorder()
    summary = generate(source, kept, rerun.moa, keep_duplicates=True)
    assert rerun.answered == [] and summary.skipped == 4


# ------------------------------------------------------------- OUT and the lock


def test_a_second_run_on_the_same_out_is_refused_at_once(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a", "b"))
    out = tmp_path / "out.jsonl"
    held = lock_output(out)  # another run in progress
    recorder = Recorder()
    try:
        with pytest.raises(OutputBusy) as info:
            generate(source, out, recorder.moa)
    finally:
        held.release()
    assert str(info.value) == (
        f"another run is writing {out} (it holds {out}.lock); wait for it to finish or "
        "choose another OUT"
    )
    assert recorder.aggregator.calls == [] and not out.exists()
    generate(source, out, recorder.moa)  # free again once the other run is gone
    assert len(read_jsonl(out)) == 2


def test_out_equal_to_the_input_is_refused(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a"))
    with pytest.raises(ConfigError, match="is the input file; choose another OUT"):
        generate(source, tmp_path / "." / "in.jsonl", Recorder().moa)
    assert read_jsonl(source) == prompts("a")


def test_an_unwritable_out_is_refused_before_any_call(tmp_path: Path, write_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recorder = Recorder()
    with pytest.raises(ConfigError, match=r"cannot create the folder of .*a-file/out.jsonl"):
        generate(source, blocker / "out.jsonl", recorder.moa)
    assert recorder.aggregator.calls == []


def test_push_without_a_token_fails_before_any_call(
    tmp_path: Path, monkeypatch, write_jsonl
) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a"))
    recorder = Recorder()
    with pytest.raises(ConfigError, match="--push-to-hub needs a Hugging Face token"):
        generate(source, tmp_path / "out.jsonl", recorder.moa, push_to_hub="me/sft")
    with pytest.raises(ConfigError, match="is not a dataset repo id"):
        generate(source, tmp_path / "out.jsonl", recorder.moa, push_to_hub="me/a b")
    assert recorder.aggregator.calls == []


def test_push_uploads_at_the_end(tmp_path: Path, monkeypatch, write_jsonl, read_jsonl) -> None:
    import huggingface_hub

    uploaded = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo, repo_type, exist_ok):
            pass

        def upload_file(self, **kwargs):
            uploaded.append(read_jsonl(Path(kwargs["path_or_fileobj"])))
            return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_faketoken1234567890")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a", "b"))
    summary = generate(source, tmp_path / "out.jsonl", Recorder().moa, push_to_hub="me/sft")
    assert summary.uploaded_to == "https://hub.example/commit/1"
    assert len(uploaded[0]) == 2  # every row was in OUT before the upload


# ------------------------------------------------------------ the first row probe


def AuthenticationError(message: str) -> openai.AuthenticationError:  # noqa: N802
    """The OpenAI SDK's 401 error (the probe goes by the error's type)."""
    request = httpx.Request("POST", "https://api.example.com/v1/chat/completions")
    return openai.AuthenticationError(
        message, response=httpx.Response(401, request=request), body=None
    )


def test_a_model_that_cannot_be_used_stops_the_run_after_the_first_row(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    good = ScriptedChatModel(model_name="good", reply="draft")
    bad = ScriptedChatModel(
        model_name="bad", fail_always=True, error=AuthenticationError("401 invalid key")
    )
    aggregator = ScriptedChatModel(model_name="agg", reply="answer")
    moa = ChatMoA(proposers=[good, bad], aggregator=aggregator)  # quorum 1: rows would pass
    source = write_jsonl(tmp_path / "in.jsonl", prompts(*(f"q{i}" for i in range(20))))
    out = tmp_path / "out.jsonl"
    with pytest.raises(RunStopped) as info:
        generate(source, out, moa, concurrency=4)
    message = str(info.value)
    assert message.startswith("stopped after the first row, before sending the other 19: ")
    assert "proposer 2 (bad): AuthenticationError" in message and "\n" not in message
    assert len(good.calls) == 1 and len(aggregator.calls) == 1  # nothing else was sent
    assert not out.exists() or read_jsonl(out) == []  # a degraded answer is not kept
    summary = info.value.summary
    assert (summary.failed, summary.not_attempted) == (1, 19)
    check_adds_up(summary)


def test_a_row_specific_failure_does_not_stop_the_run(tmp_path: Path, write_jsonl) -> None:
    moa = moa_failing_on("poison", ValueError("this prompt is too long for the model"))
    source = write_jsonl(tmp_path / "in.jsonl", prompts("poison", "a", "b"))
    summary = generate(source, tmp_path / "out.jsonl", moa)
    assert (summary.written, summary.failed) == (2, 1)


# ---------------------------------------------------------- summary and reasons


def test_the_summary_adds_up_and_reasons_are_complete_lines(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    moa = moa_failing_on("boom", RuntimeError("first line\nsecond line that matters"))
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [*prompts("done", "new", "boom", "new"), '{"prompt": "tab\tinside"}', {"x": 1}],
    )
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"id": content_id([{"role": "user", "content": "done"}]), "messages": []}])
    summary = generate(source, out, moa)
    assert summary.describe() == (
        "read 6 rows: 1 already done, 1 written, 1 failed, 2 malformed, 1 duplicate"
    )
    check_adds_up(summary)
    reasons = {e["line"]: e["reason"] for e in read_jsonl(errors_path_for(out))}
    assert "first line second line that matters" in reasons[3]
    assert reasons[5] == "invalid JSON at column 16: Invalid control character"


# ----------------------------------------------------------------------- shards


def test_shards_split_the_input_exactly(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    rows = [*prompts(*(f"q{i}" for i in range(30))), {"id": "explicit", "prompt": "x"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    seen: list[str] = []
    for i in (1, 2, 3):
        out = tmp_path / f"out.{i}.jsonl"
        summary = generate(source, out, Recorder().moa, shard=f"{i}/3")
        check_adds_up(summary)
        assert 0 < summary.written < 31
        seen += [r["id"] for r in read_jsonl(out)]
    assert len(seen) == len(set(seen)) == 31
    # deterministic: the same shard again has nothing left to do
    assert generate(source, tmp_path / "out.2.jsonl", Recorder().moa, shard="2/3").written == 0


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1", "a/b", "1/0"])
def test_bad_shards_are_one_line_errors(tmp_path: Path, bad: str, write_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a"))
    with pytest.raises(ConfigError, match=r"--shard .*: (I must be between|expected I/N)"):
        generate(source, tmp_path / "out.jsonl", Recorder().moa, shard=bad)


# --------------------------------------------------------------------- progress


def test_progress_counts_model_calls_while_rows_are_slow(
    tmp_path: Path, capsys, write_jsonl
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a", "b"))
    moa = ChatMoA(
        proposers=[ScriptedChatModel(reply="d1"), ScriptedChatModel(reply="d2")],
        aggregator=ScriptedChatModel(reply="answer"),
        layers=3,
    )
    summary = generate(source, tmp_path / "out.jsonl", moa, progress=True)
    assert summary.model_calls == 10  # 2 rows x (2 proposers x 2 layers + aggregator)
    assert "model calls 10/10" in capsys.readouterr().err


def test_label_progress_plans_samples_and_judge_calls(tmp_path: Path, capsys, write_jsonl) -> None:
    policy = ScriptedChatModel(reply=lambda m: "x" * len(policy.calls))
    judge = MoAJudge(
        judges=[ScriptedChatModel(reply="Rating: [[5]]")], mode="pointwise", aggregator=None
    )
    source = write_jsonl(tmp_path / "in.jsonl", prompts("a"))
    summary = label(source, tmp_path / "out.jsonl", judge, policy=policy, samples=3,
                    progress=True)  # fmt: skip
    assert summary.model_calls == 6  # 3 samples + 3 ratings
    assert "model calls 6/6" in capsys.readouterr().err


# ------------------------------------------------------------ output for datasets


def test_outputs_load_with_datasets_one_type_per_column(
    tmp_path: Path, write_jsonl, prefers_longer
) -> None:
    datasets = pytest.importorskip("datasets")
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "plain string", "responses": ["short", "a longer answer"]},
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "as messages"},
                ],
                "responses": ["tiny", "a much longer answer"],
            },
        ],
    )

    judge = MoAJudge(judges=[ScriptedChatModel(reply=prefers_longer)], aggregator=None)
    dpo, sft = tmp_path / "dpo.jsonl", tmp_path / "sft.jsonl"
    assert label(source, dpo, judge).written == 2
    assert generate(source, sft, Recorder().moa).written == 2

    message_list = datasets.List({"content": datasets.Value("string"),
                                  "role": datasets.Value("string")})  # fmt: skip
    prefs = datasets.load_dataset("json", data_files=str(dpo), split="train")
    for column in ("prompt", "chosen", "rejected"):
        assert prefs.features[column] == message_list, prefs.features[column]
    assert prefs[1]["chosen"] == [{"content": "a much longer answer", "role": "assistant"}]
    assert prefs.features["scores"] == datasets.List(datasets.Value("float64"))

    sft_rows = datasets.load_dataset("json", data_files=str(sft), split="train")
    assert sft_rows.features["messages"] == message_list
    assert sft_rows[1]["messages"][-1]["role"] == "assistant"
    assert "Json" not in repr(prefs.features) + repr(sft_rows.features)


# -------------------------------------------------------------------------- CLI


def test_cli_label_takes_the_recipes_defaults_and_flags_override_them(
    tmp_path: Path, monkeypatch, capsys, cli_models, write_jsonl, read_jsonl
) -> None:
    from langchain_moa import cli
    from langchain_moa.cli import data as cli_data
    from langchain_moa.recipes import LabelSettings

    def rate(messages) -> str:  # longer is better, in either mode
        body = messages[-1].text
        if "[Answer A]" in body:
            a, b = body.split("[Answer A]\n")[1].split("\n\n[Answer B]\n")
            return "[[A]]" if len(a) > len(b.split("\n\n")[0]) else "[[B]]"
        return f"Rating: [[{min(10, len(body.split('[Answer]')[1]))}]]"

    judge_model = ScriptedChatModel(reply=rate)
    cli_models(
        lambda args: {
            "proposers": [judge_model], "aggregator": judge_model, "all_local": False,
            "label": LabelSettings(mode="pointwise", samples=3, aggregate=False),
        },
    )  # fmt: skip
    counter = iter(range(1000))
    policy = ScriptedChatModel(reply=lambda m: "x" * (next(counter) % 7 + 1))
    monkeypatch.setattr(cli_data, "build_policy", lambda spec: policy)
    source = write_jsonl(tmp_path / "in.jsonl", prompts("q"))
    out = tmp_path / "dpo.jsonl"
    assert cli.main(["label", str(source), str(out), "--policy", "fake"]) == 0
    (row,) = read_jsonl(out)
    assert row["judge"]["mode"] == "pointwise" and len(row["candidates"]) == 3
    assert row["judge"]["aggregator_verdicts"] == []
    out2 = tmp_path / "dpo2.jsonl"
    argv = ["label", str(source), str(out2), "--policy", "fake", "--mode", "pairwise",
            "--samples", "2", "--no-swap", "--aggregate"]  # fmt: skip
    assert cli.main(argv) == 0
    (row,) = read_jsonl(out2)
    assert row["judge"]["mode"] == "pairwise" and len(row["candidates"]) == 2
    assert row["judge"]["swap"] is False and len(row["judge"]["aggregator_verdicts"]) == 1
    capsys.readouterr()
    assert cli.main(["generate", str(source), str(tmp_path / "o.jsonl"), "--shard", "4/3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "moa: error: --shard '4/3': I must be between 1 and N (N >= 1), e.g. 1/4"
    )


# ---------------------------------------------------------------- hostile input


@pytest.fixture
def cli_moa(cli_models) -> Recorder:
    """`moa generate` and `moa label` run on scripted models (no recipe is loaded)."""
    recorder = Recorder()

    def models(args) -> dict:
        if args.command == "label":
            judge = ScriptedChatModel(model_name="judge", reply="[[A]]")
            return {"proposers": [judge], "aggregator": judge, "all_local": False}
        return {
            "proposers": recorder.moa.proposers,
            "aggregator": recorder.aggregator,
            "all_local": False,
        }

    cli_models(models)
    return recorder


HOSTILE_LINES = {
    "invalid UTF-8": (
        b'{"prompt": "caf\xe9"}',
        "not valid UTF-8 (byte 16 of the line: invalid continuation byte); save the input as UTF-8",
    ),
    "lone surrogate in a prompt without id": (
        b'{"prompt": "a \\ud800 b"}',
        "the text holds a lone surrogate \\ud800 (half of a UTF-16 pair), which is not valid "
        "Unicode; fix that escape in the input",
    ),
    "lone surrogate in messages": (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc80"}]}]}',
        "the text holds a lone surrogate \\udc80",
    ),
    "lone surrogate in the id": (
        b'{"id": "row-\\udfff", "prompt": "fine"}',
        "'id' holds a lone surrogate \\udfff",
    ),
    "tool message without tool_call_id": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}',
        "messages[1]: role 'tool' is not supported; rows are conversations of system, user "
        "and assistant messages (a tool result needs the call it answers)",
    ),
    "100,000 [": (b"[" * 100_000, "invalid JSON: nested too deeply to parse"),
    "100,000 [ inside a prompt": (
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "invalid JSON: nested too deeply to parse",
    ),
    "an integer of 5,000 digits": (
        b'{"id": ' + b"7" * 5000 + b', "prompt": "x"}',
        "invalid JSON: Exceeds the limit (4300 digits)",
    ),
    "content of the wrong shape": (
        b'{"messages": [{"role": "user", "content": {"text": "q"}}]}',
        "messages[0]: ValidationError: ",
    ),
    "an id that is a list": (
        b'{"id": [1], "prompt": "q"}',
        "'id' must be a string or a number, got list",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_LINES))
def test_a_hostile_line_is_one_malformed_row(
    tmp_path: Path, cli_moa: Recorder, capsys, name: str, answered_in
) -> None:
    from langchain_moa import cli

    bad, reason = HOSTILE_LINES[name]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "good one"}\n' + bad + b'\n{"prompt": "good two"}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(source), str(out)]) == 1  # some rows malformed
    assert sorted(answered_in(out)) == ["good one", "good two"]
    assert sorted(cli_moa.answered) == ["good one", "good two"]  # no call for the bad row
    errors_file = errors_path_for(out)
    (error,) = [json.loads(line) for line in errors_file.read_bytes().decode("utf-8").splitlines()]
    assert (error["line"], error["kind"]) == (2, "malformed")
    assert error["reason"].startswith(reason), error["reason"]
    err = capsys.readouterr().err
    assert err.startswith(f"read 3 rows: 2 written, 0 failed, 1 malformed -> {out}\n")
    assert f"  line 2: {reason}" in err and "Traceback" not in err
    # the rerun skips the good rows and reports the bad one again
    assert cli.main(["generate", str(source), str(out)]) == 1
    assert capsys.readouterr().err.startswith("read 3 rows: 2 already done, 0 written, 0 failed")


def test_a_lone_surrogate_in_responses_is_a_malformed_label_row(
    tmp_path: Path, cli_moa: Recorder, capsys, read_jsonl
) -> None:
    from langchain_moa import cli

    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b'{"prompt": "q", "responses": ["a", "bb"]}\n'
        b'{"prompt": "q2", "responses": ["\\ud83d", "bb"]}\n'
    )
    out = tmp_path / "dpo.jsonl"
    argv = ["label", str(source), str(out), "--mode", "pairwise", "--no-swap", "--no-aggregate"]
    assert cli.main(argv) == 1
    assert len(read_jsonl(out)) == 1
    (error,) = read_jsonl(errors_path_for(out))
    assert error["line"] == 2 and "lone surrogate \\ud83d" in error["reason"]


def test_a_lone_surrogate_from_a_model_fails_its_row_only(
    tmp_path: Path, write_jsonl, read_jsonl, answered_in
) -> None:
    def reply(messages) -> str:
        text = messages[-1].text
        if "answer" in text:
            return "half an emoji \ud83d"
        if "raise" in text:
            raise RuntimeError("upstream said \udc00")
        return "fine"

    moa = ChatMoA(
        proposers=[ScriptedChatModel(reply="draft")], aggregator=ScriptedChatModel(reply=reply)
    )
    source = write_jsonl(tmp_path / "in.jsonl", prompts("ok", "answer", "raise", "ok too"))
    out = tmp_path / "out.jsonl"
    summary = generate(source, out, moa, concurrency=1)
    assert (summary.written, summary.failed) == (2, 2)
    out.read_bytes().decode("utf-8")  # OUT stays valid UTF-8 (datasets can load it)
    assert sorted(answered_in(out)) == ["ok", "ok too"]
    reasons = [e["reason"] for e in read_jsonl(errors_path_for(out))]
    assert any("the output row holds a lone surrogate \\ud83d" in r for r in reasons), reasons
    assert any(r.endswith("upstream said \\udc00") for r in reasons), reasons  # spelled out
    errors_path_for(out).read_bytes().decode("utf-8")
    assert all(f["reason"].encode("utf-8") for f in summary.failures)  # printable as they are


# ------------------------------------------------------ files a run writes vs input


@pytest.mark.parametrize(
    "how",
    ["errors file is the input", "lock is the input", "errors file is a hardlink",
     "errors file is a symlink", "OUT is a symlink", "OUT is a hardlink"],
)  # fmt: skip
def test_no_file_a_run_writes_may_be_the_input(
    tmp_path: Path, cli_moa: Recorder, capsys, how: str
) -> None:
    import os

    from langchain_moa import cli

    out = tmp_path / "out.jsonl"
    data = b'{"prompt": "keep me"}\n{"prompt": "and me"}\n'
    source = tmp_path / "in.jsonl"
    source.write_bytes(data)
    if how == "errors file is the input":
        source = source.rename(tmp_path / "out.jsonl.errors.jsonl")
    elif how == "lock is the input":
        source = source.rename(tmp_path / "out.jsonl.lock")
    elif how == "errors file is a hardlink":
        os.link(source, tmp_path / "out.jsonl.errors.jsonl")
    elif how == "errors file is a symlink":
        (tmp_path / "out.jsonl.errors.jsonl").symlink_to(source)
    elif how == "OUT is a symlink":
        out.symlink_to(source)
    else:
        os.link(source, out)
    assert cli.main(["generate", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moa: error: OUT {out} ")
    if how.startswith("OUT"):
        assert err.endswith("is the input file; choose another OUT\n")
    else:
        what = "lock" if how.startswith("lock") else "errors file"
        assert f"would overwrite the input: its {what} " in err
        assert err.endswith(" is the input file; choose another OUT\n")
    assert source.read_bytes() == data  # untouched
    assert cli_moa.answered == []


# ------------------------------------------------------------ an id marks a row done


def test_content_edited_under_a_done_id_is_reported(
    tmp_path: Path, cli_moa: Recorder, capsys, write_jsonl, read_jsonl
) -> None:
    from langchain_moa import cli

    rows = [{"id": "q1", "prompt": "old"}, {"id": "q2", "prompt": "same"}, {"prompt": "no id"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(source), str(out)]) == 0
    before = out.read_bytes()
    rows[0]["prompt"] = "new"
    rows[2]["prompt"] = "no id, edited"  # a content id: simply a new row
    write_jsonl(source, rows)
    capsys.readouterr()
    assert cli.main(["generate", str(source), str(out)]) == 0  # reported, not a failure
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"read 3 rows: 2 already done (1 with changed content under the same id), "
        f"1 written, 0 failed -> {out}"
    )
    assert err[1] == (
        f"  1 row was not redone although the input changed under an id already in {out} "
        "(q1): an id marks its row done; to redo one, remove its line from OUT or give it "
        "a new id"
    )
    assert out.read_bytes().startswith(before)  # q1's old answer stays; nothing rewritten
    assert cli_moa.answered[-1] == "no id, edited" and "new" not in cli_moa.answered
    (note,) = read_jsonl(errors_path_for(out))
    assert (note["id"], note["line"], note["kind"]) == ("q1", 1, "changed")
    assert "remove its line from OUT or give it a new id" in note["reason"]


def test_label_reports_responses_edited_under_a_done_id(tmp_path: Path, write_jsonl) -> None:
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")], swap=False)
    rows = [
        {"id": "a", "prompt": "q", "responses": ["x", "y"]},
        {"id": "b", "prompt": "q", "responses": ["x", "y"]},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "dpo.jsonl"
    assert label(source, out, judge).written == 2
    rows[1]["responses"] = ["x", "z"]
    write_jsonl(source, rows)
    summary = label(source, out, judge)
    assert summary.skipped == 2 and [c["id"] for c in summary.changed] == ["b"]
    # sampled candidates differ on every run: only the prompt counts then
    policy = ScriptedChatModel(reply=lambda m: "s" * (len(policy.calls) % 3 + 1))
    sampled = write_jsonl(tmp_path / "sampled.jsonl", [{"id": "s", "prompt": "q"}])
    out2 = tmp_path / "dpo2.jsonl"
    label(sampled, out2, judge, policy=policy, samples=2)
    assert label(sampled, out2, judge, policy=policy, samples=2).changed == []


# ------------------------------------------------------- a run-wide system message


def test_system_is_part_of_each_rows_content(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    """The run's system message goes first where a row has none; it is the row's content."""
    own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "b"}]
    sent = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"}]
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"messages": own},
                                                 {"messages": sent}])  # fmt: skip
    out = tmp_path / "out.jsonl"
    recorder = Recorder()
    summary = generate(source, out, recorder.moa, system="Be kind.")
    # "a" under the run's system message is the conversation line 3 spells out
    assert (summary.written, summary.duplicates) == (2, 1)
    systems = [m[0].text for m in recorder.aggregator.calls]
    assert sorted(s.split("\n")[0] for s in systems) == ["Be kind.", "Be terse."]
    stored = {r["messages"][-2]["content"]: r for r in read_jsonl(out)}
    assert stored["a"]["id"] == content_id(sent)
    assert stored["b"]["messages"][:2] == own and stored["b"]["id"] == content_id(own)
    # without it, "a" is another conversation: answered, never skipped as done
    again = Recorder()
    summary = generate(source, out, again.moa)
    assert again.answered == ["a"] and summary.skipped == 2


def test_label_system_and_temperature_shape_the_policys_samples(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    policy = ScriptedChatModel(reply=lambda m: "s" * (len(policy.calls) % 3 + 1))
    seen = []
    bind = policy.bind

    def recording_bind(**kwargs):
        seen.append(kwargs)
        return bind(**kwargs)

    object.__setattr__(policy, "bind", recording_bind)

    def longer_is_better(messages) -> str:
        return f"Rating: [[{min(10, len(messages[-1].text.split('[Answer]')[1]))}]]"

    judge = MoAJudge(judges=[ScriptedChatModel(reply=longer_is_better)], mode="pointwise")
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "q"}, {"prompt": "given", "responses": ["x", "yy"]},
    ])  # fmt: skip
    out = tmp_path / "dpo.jsonl"
    label(source, out, judge, policy=policy, samples=2, temperature=0.25, system="Be kind.")
    assert [k["temperature"] for k in seen] == [0.25, 0.25]
    assert [m[0].text for m in policy.calls] == ["Be kind.", "Be kind."]
    prompts_stored = [r["prompt"] for r in read_jsonl(out)]
    assert [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "q"}] in (
        prompts_stored
    )
    assert [{"role": "user", "content": "given"}] in prompts_stored  # ranked as it was
    judged = "\n".join(m[-1].text for m in judge.judges[0].calls)
    assert "system: Be kind.\nuser: q" in judged  # the judges see the whole conversation


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"temperature": 0.5}, "--temperature needs --policy"),
        ({"system": "Be kind."}, "--system needs --policy"),
    ],
)
def test_label_sampling_options_without_a_policy_are_refused(
    tmp_path: Path, options: dict, fragment: str, write_jsonl
) -> None:
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")], swap=False)
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "responses": ["a", "b"]}])
    with pytest.raises(ConfigError, match=fragment):
        label(source, tmp_path / "out.jsonl", judge, **options)


def test_an_empty_system_message_is_refused(tmp_path: Path, write_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompts("q"))
    with pytest.raises(ConfigError, match="--system is empty"):
        generate(source, tmp_path / "out.jsonl", Recorder().moa, system="  ")

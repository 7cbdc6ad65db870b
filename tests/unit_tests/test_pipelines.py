"""MoAA pipelines with fake models: formats, resume, torn lines, errors, HF Hub I/O, CLI."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from langchain_moa import ChatMoA, ConfigError, cli
from langchain_moa.data import content_id, generate, label, read_rows
from langchain_moa.data.hub import upload_to_hub
from langchain_moa.data.output import completed_ids, errors_path_for
from langchain_moa.judge import MoAJudge
from langchain_moa.testing import ScriptedChatModel, free_port


def echo_moa() -> ChatMoA:
    return ChatMoA(
        proposers=[ScriptedChatModel(model_name="p", reply="draft")],
        aggregator=ScriptedChatModel(model_name="agg", reply=lambda m: "answer: " + m[-1].text),
    )


def test_generate_writes_trl_sft_rows(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "q1", "prompt": "What is MoA?"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = generate(source, out, echo_moa(), concurrency=2)
    assert (summary.written, summary.failed, summary.skipped) == (2, 0, 0)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert rows["q1"]["messages"] == [
        {"role": "user", "content": "What is MoA?"},
        {"role": "assistant", "content": "answer: What is MoA?"},
    ]
    second = content_id(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert rows[second]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[second]["messages"][-1] == {"role": "assistant", "content": "answer: Hi"}
    assert rows["q1"]["proposals"][0]["proposals"][0]["answer"] == "draft"
    assert rows["q1"]["usage"]["total_tokens"] == 30


def test_rerun_skips_done_rows_and_repairs_a_torn_line(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"q{i}"} for i in range(5)]
    )
    out = tmp_path / "out.jsonl"
    generate(source, out, echo_moa())
    lines = out.read_text().splitlines(keepends=True)
    # simulate a kill: keep two whole rows and half of the third
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    kept = {json.loads(lines[0])["id"], json.loads(lines[1])["id"]}
    assert completed_ids(out) == kept
    assert out.read_text().endswith("\n")  # the torn tail was cut off
    summary = generate(source, out, echo_moa())
    assert summary.skipped == 2 and summary.written == 3
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == [f"r{i}" for i in range(5)] and len(ids) == len(set(ids))


def test_malformed_lines_are_reported_with_their_line_number(
    tmp_path: Path, write_jsonl, read_jsonl
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "ok", "prompt": "fine"},
            "{not json",
            {"id": "x", "text": "no prompt"},
            {"id": "ok", "prompt": "duplicate id"},
            {"messages": [{"role": "wizard", "content": "?"}]},
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = generate(source, out, echo_moa())
    assert summary.written == 1 and summary.malformed == 4 and not summary.ok
    assert summary.failed == 0 and summary.read == 5
    errors = read_jsonl(errors_path_for(out))
    assert [e["line"] for e in errors] == [2, 3, 4, 5]
    assert {e["kind"] for e in errors} == {"malformed"}
    assert errors[0]["reason"] == (
        "invalid JSON at column 2: Expecting property name enclosed in double quotes"
    )
    assert "needs a non-empty 'prompt'" in errors[1]["reason"]
    assert "duplicate id 'ok' (first on line 1)" in errors[2]["reason"]


def test_failing_rows_go_to_the_errors_file(tmp_path: Path, write_jsonl, read_jsonl) -> None:
    moa = ChatMoA(
        proposers=[ScriptedChatModel(fail_always=True, error=RuntimeError("provider down"))],
        aggregator=ScriptedChatModel(),
    )
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "q"}])
    summary = generate(source, tmp_path / "out.jsonl", moa)
    assert summary.failed == 1 and summary.written == 0
    (error,) = read_jsonl(errors_path_for(tmp_path / "out.jsonl"))
    assert error["id"] == "a" and "MoAError" in error["reason"]


def test_label_ranks_given_responses_into_dpo_rows(
    tmp_path: Path, write_jsonl, read_jsonl, prefers_longer
) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "s", "prompt": "Explain tides.", "responses": ["short", "a longer answer"]},
            {
                "id": "m",
                "messages": [{"role": "user", "content": "Explain waves."}],
                "responses": ["a much longer answer here", "tiny", "medium one"],
            },
        ],
    )
    judge = MoAJudge(judges=[ScriptedChatModel(reply=prefers_longer)])
    out = tmp_path / "dpo.jsonl"
    summary = label(source, out, judge)
    assert summary.written == 2
    rows = {r["id"]: r for r in read_jsonl(out)}
    # conversational form for every row, whatever form the input used
    assert rows["s"]["prompt"] == [{"role": "user", "content": "Explain tides."}]
    assert rows["s"]["chosen"] == [{"role": "assistant", "content": "a longer answer"}]
    assert rows["s"]["rejected"] == [{"role": "assistant", "content": "short"}]
    assert rows["m"]["prompt"] == [{"role": "user", "content": "Explain waves."}]
    assert rows["m"]["chosen"] == [{"role": "assistant", "content": "a much longer answer here"}]
    assert rows["m"]["rejected"] == [{"role": "assistant", "content": "tiny"}]
    assert len(rows["m"]["scores"]) == 3 and rows["m"]["judge"]["mode"] == "pairwise"


def test_label_samples_from_a_policy(
    tmp_path: Path, write_jsonl, read_jsonl, prefers_longer
) -> None:
    counter = iter(range(100))
    policy = ScriptedChatModel(reply=lambda m: "x" * (next(counter) + 1))
    judge = MoAJudge(judges=[ScriptedChatModel(reply=prefers_longer)])
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "q"}])
    summary = label(source, tmp_path / "out.jsonl", judge, policy=policy, samples=4)
    assert summary.written == 1
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert len(row["candidates"]) == 4 and len(policy.calls) == 4
    assert len(row["chosen"][0]["content"]) == max(len(c) for c in row["candidates"])


def test_label_without_responses_or_policy_is_a_user_error(tmp_path: Path, write_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "q"}])
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")])
    with pytest.raises(ConfigError, match="line 1: no 'responses' to rank"):
        label(source, tmp_path / "out.jsonl", judge)


def test_label_all_tied_is_a_failed_row(tmp_path: Path, write_jsonl) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "q", "responses": ["x", "y"]}]
    )
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[C]]")])
    summary = label(source, tmp_path / "out.jsonl", judge)
    assert summary.failed == 1
    assert "no preference" in summary.failures[0]["reason"]


@pytest.fixture
def hub_endpoint() -> Iterator[str]:
    """A loopback stand-in for the Hub's address (the probe only needs an HTTP answer)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    # polled every 50 ms, so shutdown() at teardown returns at once (the default is 0.5 s)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hf_input_with_the_hub_unreachable_fails_at_once(tmp_path: Path, monkeypatch) -> None:

    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        generate("hf://datasets/org/prompts/train.jsonl", tmp_path / "o.jsonl", echo_moa())
    assert time.monotonic() - started < 5  # not huggingface_hub's 25 s of retries
    assert "cannot reach http://127.0.0.1:" in str(info.value)
    assert "not in the Hugging Face cache; check the network" in str(info.value)
    assert str(info.value).endswith("or use a local file")


def test_hf_dataset_input(tmp_path: Path, monkeypatch, hub_endpoint: str, write_jsonl) -> None:
    local_copy = write_jsonl(tmp_path / "cached.jsonl", [{"id": "h", "prompt": "from the hub"}])
    seen = {}

    def fake_download(repo_id, filename, repo_type):
        seen.update(repo_id=repo_id, filename=filename, repo_type=repo_type)
        return str(local_copy)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub_endpoint)
    summary = generate(
        "hf://datasets/org/prompts/data/train.jsonl", tmp_path / "o.jsonl", echo_moa()
    )
    assert summary.written == 1
    assert seen == {
        "repo_id": "org/prompts",
        "filename": "data/train.jsonl",
        "repo_type": "dataset",
    }


def test_push_to_hub_uses_hf_token_and_never_leaks_it(
    tmp_path: Path, monkeypatch, write_jsonl
) -> None:
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": "a"}])
    token = "hf_secrettoken1234567890"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo, repo_type, exist_ok):
            calls.append(("create", repo, repo_type))

        def upload_file(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], kwargs["path_in_repo"]))
            raise RuntimeError(f"403 Forbidden for token {token}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(ConfigError) as info:
        upload_to_hub(out, "me/moa-sft")
    assert token not in str(info.value) and "upload to me/moa-sft failed" in str(info.value)
    assert calls[0] == ("init", token) and calls[1] == ("create", "me/moa-sft", "dataset")
    assert calls[2] == ("upload", "me/moa-sft", "out.jsonl")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="set HF_TOKEN"):
        upload_to_hub(out, "me/moa-sft")


def test_read_rows_accepts_prompt_or_messages(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, "", {"id": 7, "prompt": "b"}])
    rows, problems = read_rows(path)
    assert [r.id for r in rows] == [content_id([{"role": "user", "content": "a"}]), "7"]
    assert problems == []


def test_cli_generate_and_label(
    tmp_path: Path, capsys, cli_models, write_jsonl, read_jsonl, prefers_longer
) -> None:
    judge_model = ScriptedChatModel(reply=prefers_longer)
    cli_models(
        lambda args: {
            "proposers": [ScriptedChatModel(reply="draft")]
            if args.command == "generate"
            else [judge_model],
            "aggregator": ScriptedChatModel(reply=lambda m: "answer: " + m[-1].text)
            if args.command == "generate"
            else judge_model,
            "layers": 2,
            "min_proposers": 1,
            "proposer_timeout": None,
            "all_local": False,
        },
    )
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "q", "responses": ["x", "xyz"]}]
    )
    out = tmp_path / "sft.jsonl"
    assert cli.main(["generate", str(source), str(out)]) == 0
    assert read_jsonl(out)[0]["messages"][-1]["content"] == "answer: q"
    dpo = tmp_path / "dpo.jsonl"
    assert cli.main(["label", str(source), str(dpo), "--no-aggregate"]) == 0
    assert read_jsonl(dpo)[0]["chosen"] == [{"role": "assistant", "content": "xyz"}]
    bad = write_jsonl(
        tmp_path / "bad.jsonl", ["{oops", {"id": "b", "prompt": "q", "responses": ["x", "yy"]}]
    )
    assert cli.main(["label", str(bad), str(tmp_path / "d2.jsonl"), "--no-aggregate"]) == 1
    assert "line 1: invalid JSON at column 2" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "missing.jsonl"), str(out)]) == cli.EXIT_USER_ERROR


def test_label_samples_have_the_config_files_range(tmp_path: Path, write_jsonl) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "q"}])
    judge = MoAJudge(judges=[ScriptedChatModel(reply="[[A]]")])
    policy = ScriptedChatModel(reply="x")
    with pytest.raises(ConfigError, match=r"--samples must be at most 32 \(pairwise judging"):
        label(source, tmp_path / "out.jsonl", judge, policy=policy, samples=33)
    assert policy.calls == [] and not (tmp_path / "out.jsonl").exists()


def test_read_rows_keeps_number_ids_and_a_leading_bom(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    # pandas writes an int column with gaps as floats; a Windows editor may add a BOM
    path.write_bytes(b'\xef\xbb\xbf{"id": 3.0, "prompt": "a"}\r\n{"id": 4, "prompt": "b"}\r\n')
    rows, problems = read_rows(path)
    assert [r.id for r in rows] == ["3.0", "4"] and problems == []

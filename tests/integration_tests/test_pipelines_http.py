"""Both pipelines over real HTTP, including a run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer, free_port

pytestmark = pytest.mark.http


def prefers_longer(body: dict) -> str:
    text = body["messages"][-1]["content"]
    if "[Answer A]" not in text:
        return "plain answer"
    a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = text.split("[Answer B]\n")[1]
    return "Longer is better here. [[A]]" if len(a) > len(b) else "B says more. [[B]]"


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="draft one", latency=0.2),
        "p2": ModelScript(reply="draft two", latency=0.2),
        "agg": ModelScript(reply=lambda body: "final: " + body["messages"][-1]["content"]),
        "j1": ModelScript(reply=prefers_longer),
        "j2": ModelScript(reply=prefers_longer),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        yield srv


def config(tmp_path: Path, server: ScriptedOpenAIServer, proposers: list[str], agg: str) -> Path:
    entry = 'model = "{}"\nbase_url = "{}"\napi_key_env = "SCRIPTED_KEY"\n'
    text = "layers = 2\n" + "".join(
        "[[proposers]]\n" + entry.format(p, server.base_url) for p in proposers
    )
    text += "[aggregator]\n" + entry.format(agg, server.base_url)
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def moa_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCRIPTED_KEY": "sk-scripted-test", **(env or {})},
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def answered(server: ScriptedOpenAIServer, model: str = "agg") -> list[str]:
    """The questions the aggregator was asked (its last message is the user's)."""
    return [r.body["messages"][-1]["content"] for r in server.requests_for(model)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_killed_midway_resumes_with_every_row_once(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1", "p2"], "agg")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(24)))
    out = tmp_path / "out.jsonl"

    first = moa_cli("generate", str(source), str(out), "--config", str(cfg), "--concurrency", "2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = out.read_text().count("\n")
    assert 4 <= done_before < 24  # killed mid-way

    second = moa_cli("generate", str(source), str(out), "--config", str(cfg), "--concurrency", "4")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "already done" in err
    result = rows(out)
    ids = [r["id"] for r in result]
    assert len(ids) == len(set(ids)) == 24
    asked = sorted(r["messages"][0]["content"] for r in result)
    assert asked == sorted(f"question {i}" for i in range(24))
    for r in result:
        assert r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-1]["content"].startswith("final: ")


def test_label_over_http_with_an_moa_judge(tmp_path: Path, server: ScriptedOpenAIServer) -> None:
    cfg = config(tmp_path, server, ["j1", "j2"], "j1")
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "t", "prompt": "Why is the sky blue?",
                    "responses": ["Rayleigh.", "Rayleigh scattering of sunlight.", "Magic"]})
        + "\n"
    )  # fmt: skip
    out = tmp_path / "dpo.jsonl"
    proc = moa_cli("label", str(source), str(out), "--config", str(cfg))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (row,) = rows(out)
    assert row["chosen"] == [{"role": "assistant", "content": "Rayleigh scattering of sunlight."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Magic"}]
    # 3 pairs x 2 orders x 2 judges, then 6 aggregator calls with the verdicts injected
    assert len(row["judge"]["verdicts"]) == 12
    assert len(row["judge"]["aggregator_verdicts"]) == 6
    assert server.requests_for("j2")  # both judges were asked


# ------------------------------------------------------- exactly once in messy use


def test_editing_the_input_between_runs_answers_each_prompt_once(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1", "p2"], "agg")
    source = write_prompts(tmp_path / "in.jsonl", [f"question {i}" for i in range(6)])
    out = tmp_path / "out.jsonl"
    code, err = finish(moa_cli("generate", str(source), str(out), "--config", str(cfg)))
    assert code == 0, err
    # the user inserts a prompt at the top, deletes one, appends one
    edited = ["brand new", *[f"question {i}" for i in range(6) if i != 2], "appended"]
    write_prompts(source, edited)
    code, err = finish(moa_cli("generate", str(source), str(out), "--config", str(cfg)))
    assert code == 0, err
    assert "read 7 rows: 5 already done, 2 written, 0 failed" in err
    assert sorted(answered(server)) == sorted([f"question {i}" for i in range(6)]
                                              + ["brand new", "appended"])  # fmt: skip
    in_out = sorted(r["messages"][0]["content"] for r in rows(out))
    assert in_out == sorted({*edited, "question 2"})


def test_a_second_run_on_the_same_out_exits_2_at_once(tmp_path: Path) -> None:
    scripts = {"slow": ModelScript(reply="draft", latency=1.0), "agg": ModelScript(reply="ok")}
    with ScriptedOpenAIServer(scripts=scripts) as server:
        second_run_refused(tmp_path, server)


def second_run_refused(tmp_path: Path, server: ScriptedOpenAIServer) -> None:
    cfg = config(tmp_path, server, ["slow"], "agg")
    source = write_prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(12)])
    out = tmp_path / "out.jsonl"
    first = moa_cli("generate", str(source), str(out), "--config", str(cfg), "--concurrency", "2")
    deadline = time.monotonic() + 60
    while not server.requests_for("slow") and time.monotonic() < deadline:
        time.sleep(0.02)  # the first run holds the lock and is calling models
    started = time.monotonic()
    code, err = finish(moa_cli("generate", str(source), str(out), "--config", str(cfg)))
    assert code == 2 and time.monotonic() - started < 15
    lines = err.strip().splitlines()
    assert lines == [
        f"moa: error: another run is writing {out} (it holds {out}.lock); wait for it to "
        "finish or choose another OUT"
    ]
    code, err = finish(first)
    assert code == 0, err
    result = rows(out)
    assert len(result) == 12 == len({r["id"] for r in result})  # not 24
    assert len(answered(server)) == 12


def test_push_without_a_token_fails_before_the_first_model_call(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1", "p2"], "agg")
    source = write_prompts(tmp_path / "in.jsonl", ["q"])
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "langchain_moa.cli", "generate", str(source),
         str(tmp_path / "out.jsonl"), "--config", str(cfg), "--push-to-hub", "me/sft"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "SCRIPTED_KEY": "sk-scripted-test"},
    )  # fmt: skip
    code, err = finish(proc)
    assert code == 2
    assert err.strip() == (
        "moa: error: --push-to-hub needs a Hugging Face token: set HF_TOKEN (or run "
        "`hf auth login`)"
    )
    assert server.requests == []


def test_a_rejected_key_stops_the_run_after_the_first_row(tmp_path: Path) -> None:
    scripts = {
        "p1": ModelScript(reply="draft one"),
        "locked": ModelScript(reject_key=True),
        "agg": ModelScript(reply="final"),
    }
    with ScriptedOpenAIServer(scripts=scripts) as srv:
        cfg = config(tmp_path, srv, ["p1", "locked"], "agg")
        source = write_prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(30)])
        out = tmp_path / "out.jsonl"
        code, err = finish(moa_cli("generate", str(source), str(out), "--config", str(cfg)))
        assert code == 2
        (line,) = err.strip().splitlines()
        assert line.startswith(
            "moa: error: stopped after the first row, before sending the other 29: "
            "proposer 2 (locked): OpenAIAuthenticationError: Error code: 401"
        )
        assert "sk-scripted-test" not in err
        assert len(srv.requests_for("p1")) == 1 and len(srv.requests_for("agg")) == 1
        assert rows(out) == []


def test_an_unreachable_endpoint_stops_the_run_after_the_first_row(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    entry = f'model = "m"\nbase_url = "{closed}"\napi_key_env = "SCRIPTED_KEY"\n'
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"layers = 2\n[[proposers]]\n{entry}[aggregator]\n{entry}")
    source = write_prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(50)])
    code, err = finish(moa_cli("generate", str(source), str(tmp_path / "o.jsonl"),
                               "--config", str(cfg)))  # fmt: skip
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("moa: error: stopped after the first row, before sending the other 49")
    assert "Connection" in line


def test_hostile_lines_are_reported_and_never_sent(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1"], "agg")
    source = tmp_path / "in.jsonl"
    hostile = [
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"prompt": "half \\ud83d"}',  # a lone surrogate, no id
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}',
        b"[" * 100_000,
    ]
    good = [b'{"prompt": "first"}', b'{"id": "b", "prompt": "second"}']
    source.write_bytes(b"\n".join([good[0], *hostile, good[1]]) + b"\n")
    out = tmp_path / "out.jsonl"
    code, err = finish(moa_cli("generate", str(source), str(out), "--config", str(cfg)))
    assert code == 1, err
    assert err.startswith(f"read 6 rows: 2 written, 0 failed, 4 malformed -> {out}\n"), err
    assert "Traceback" not in err
    assert sorted(answered(server)) == ["first", "second"]  # nothing else reached a model
    assert sorted(r["messages"][0]["content"] for r in rows(out)) == ["first", "second"]
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text(
        encoding="utf-8").splitlines()]  # fmt: skip
    assert [(e["line"], e["kind"]) for e in errors] == [(n, "malformed") for n in (2, 3, 4, 5)]


# ------------------------------------------------------- --system and --temperature


def sent_system(request) -> str | None:
    """The system message a request opened with (None when it had none)."""
    first = request.messages[0]
    return first["content"] if first["role"] == "system" else None


def test_generate_system_reaches_every_model_and_is_part_of_the_row(
    tmp_path: Path, server: ScriptedOpenAIServer
) -> None:
    cfg = config(tmp_path, server, ["p1", "p2"], "agg")
    source = tmp_path / "in.jsonl"
    own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "own"}]
    source.write_text(
        json.dumps({"prompt": "plain"}) + "\n"
        + json.dumps({"id": "q", "prompt": "with id"}) + "\n"
        + json.dumps({"messages": own}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out.jsonl"

    def run(system: str) -> tuple[int, str]:
        args = ["generate", str(source), str(out), "--config", str(cfg), "--system", system]
        return finish(moa_cli(*args))

    code, err = run("Answer in French.")
    assert code == 0, err
    for request in server.requests:  # drafts and the answer were made under it
        asked = request.messages[-1]["content"]
        expected = "Be terse." if asked == "own" else "Answer in French."
        assert sent_system(request) is not None
        assert sent_system(request).startswith(expected), (request.model, request.messages)
    by_question = {r["messages"][-2]["content"]: r for r in rows(out)}
    assert by_question["plain"]["messages"][:2] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "plain"},
    ]
    assert by_question["own"]["messages"][:2] == own  # a row's own system message is kept

    server.reset()
    code, err = run("Answer in French.")  # the same run again: nothing to do
    assert code == 0 and "3 already done, 0 written" in err, err
    assert server.requests == []

    code, err = run("Answer in German.")  # another system message: another conversation
    assert code == 0, err
    summary = "read 3 rows: 2 already done (1 with changed content under the same id), 1 written"
    assert summary in err
    assert "not redone although the input changed under an id already in" in err and "(q)" in err
    assert sorted(answered(server)) == ["plain"]  # not skipped as done under French
    assert {sent_system(r).split("\n")[0] for r in server.requests} == {"Answer in German."}
    assert len(rows(out)) == 4


def policy_reply(body: dict) -> str:
    return "x" * (body["seed"] - 995)  # each sample its own length: 5, 6, 7 ...


@pytest.fixture
def policy_env(server: ScriptedOpenAIServer) -> dict[str, str]:
    server.set_script("pol", ModelScript(reply=policy_reply))
    return {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-scripted-test"}


def test_label_policy_samples_at_temperature_under_the_system_message(
    tmp_path: Path, server: ScriptedOpenAIServer, policy_env: dict[str, str]
) -> None:
    cfg = config(tmp_path, server, ["j1", "j2"], "j1")
    source = write_prompts(tmp_path / "in.jsonl", ["Why is the sky blue?"])
    out = tmp_path / "dpo.jsonl"
    args = ["label", str(source), str(out), "--config", str(cfg), "--policy", "openai:pol",
            "--samples", "3", "--temperature", "0.35", "--system", "Answer in French."]  # fmt: skip
    code, err = finish(moa_cli(*args, env=policy_env))
    assert code == 0, err
    sampled = server.requests_for("pol")
    assert [r.body["temperature"] for r in sampled] == [0.35, 0.35, 0.35]
    assert sorted(r.body["seed"] for r in sampled) == [1000, 1001, 1002]
    assert {sent_system(r) for r in sampled} == {"Answer in French."}
    judged = server.requests_for("j1") + server.requests_for("j2")
    assert judged and all(
        "system: Answer in French.\nuser: Why is the sky blue?" in r.messages[-1]["content"]
        for r in judged
    )  # the judges see the conversation the candidates answered
    assert {r.body.get("temperature") for r in judged} != {0.35}  # judges keep theirs
    (row,) = rows(out)
    assert row["prompt"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "x" * 7}]


def test_label_policy_default_temperatures_are_spread(
    tmp_path: Path, server: ScriptedOpenAIServer, policy_env: dict[str, str]
) -> None:
    cfg = config(tmp_path, server, ["j1"], "j1")
    source = write_prompts(tmp_path / "in.jsonl", ["q"])
    args = ["label", str(source), str(tmp_path / "dpo.jsonl"), "--config", str(cfg),
            "--policy", "openai:pol", "--samples", "3"]  # fmt: skip
    code, err = finish(moa_cli(*args, env=policy_env))
    assert code == 0, err
    sampled = sorted(server.requests_for("pol"), key=lambda r: r.body["seed"])
    assert [r.body["temperature"] for r in sampled] == [0.6, 0.9, 1.2]
    assert all(sent_system(r) is None for r in sampled)

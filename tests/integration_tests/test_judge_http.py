"""MoAJudge's probability scorings over real HTTP (the scripted server, ChatOpenAI).

The scripted server plays a llama.cpp-like judge: it follows a literal grammar when one is
sent and returns OpenAI's ``logprobs`` with the alternatives a test chooses.
"""

from __future__ import annotations

import math
import re

import pytest

from langchain_moa import MoAJudge
from langchain_moa.errors import ConfigError
from langchain_moa.judge import JudgeError, literal_grammar
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer

CANDIDATES = ["Paris is the capital.", "Berlin is the capital."]


def _unescape(literal: str) -> str:
    return re.sub(
        r"\\(x[0-9A-Fa-f]{2}|.)",
        lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" and len(m[1]) == 3 else
        {"n": "\n"}.get(m[1], m[1]),
        literal,
    )  # fmt: skip


def follows_grammar(body: dict) -> str:
    """What a llama.cpp server writes under a one-sentence grammar: exactly that sentence."""
    match = re.fullmatch(r'root ::= "(.*)"', body.get("grammar", ""), re.S)
    return _unescape(match[1]) if match else "I would rather write something else."


def knows_paris(token: str, body: dict) -> dict[str, float]:
    """A judge model that finds "Paris" likely and "Berlin" unlikely as the capital."""
    return {token: {"Paris": -0.1, "Berlin": -4.0}.get(token.strip(), -0.5)}


@pytest.fixture
def server():
    with ScriptedOpenAIServer(
        {"judge": ModelScript(reply=follows_grammar, token_logprobs=knows_paris)}
    ) as srv:
        yield srv


def test_likelihood_picks_the_answer_the_judge_finds_likely(server) -> None:
    judges = [server.chat_model("judge", temperature=0.7, seed=s, max_tokens=4) for s in (1, 2)]
    judge = MoAJudge(judges, mode="likelihood", grammar=True)
    result = judge.rank("What is the capital of France?", CANDIDATES)

    assert (result.chosen, result.rejected) == (0, 1)
    words = [-0.5, -0.5, -0.5]  # "is", "the", "capital." around the city
    assert result.scores[0] == pytest.approx(sum([-0.1, *words]) / 4)
    assert result.scores[1] == pytest.approx(sum([-4.0, *words]) / 4)
    # the two judges differ only in sampling: one is asked, once per candidate
    requests = server.requests_for("judge")
    assert len(requests) == 2 == judge.calls_for(2)
    # the two requests run concurrently: match them to the candidates by their grammars
    grammars = {literal_grammar(c): c for c in CANDIDATES}
    assert sorted(r.body["grammar"] for r in requests) == sorted(grammars)
    for request in requests:
        body = request.body
        candidate = grammars[body["grammar"]]
        assert body["logprobs"] is True and body["temperature"] == 0
        # the judge's own cap (4 tokens) would cut the candidate off
        assert (body.get("max_completion_tokens") or body["max_tokens"]) >= len(candidate)
        # the user's request as the judge's conversation, with no judging instructions
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert body["messages"][0]["content"] == "What is the capital of France?"


async def test_likelihood_async_matches_sync(server) -> None:
    judge = MoAJudge([server.chat_model("judge")], mode="likelihood", grammar=True)
    result = await judge.arank("What is the capital of France?", CANDIDATES)
    assert result.scores == judge.rank("What is the capital of France?", CANDIDATES).scores


def test_likelihood_asks_each_distinct_judge(server) -> None:
    server.set_script("other", ModelScript(reply=follows_grammar, token_logprobs=knows_paris))
    judge = MoAJudge(
        [server.chat_model("judge"), server.chat_model("other")], mode="likelihood", grammar=True
    )
    judge.rank("Capital of France?", CANDIDATES)
    assert len(server.requests_for("judge")) == len(server.requests_for("other")) == 2


def test_likelihood_on_a_server_without_grammars_abstains_and_says_why() -> None:
    # the server ignores the grammar and writes its own answer: nothing to score
    script = ModelScript(reply="Something else entirely.", token_logprobs=knows_paris)
    with ScriptedOpenAIServer({"judge": script}) as srv:
        judge = MoAJudge([srv.chat_model("judge")], mode="likelihood", grammar=True)
        with pytest.raises(JudgeError, match="did not write the candidate back"):
            judge.rank("Capital of France?", CANDIDATES)
        assert len(srv.requests_for("judge")) == 4  # each candidate asked twice, then abstains


def test_likelihood_without_logprobs_abstains_and_says_why() -> None:
    with ScriptedOpenAIServer({"judge": ModelScript(reply=follows_grammar)}) as srv:
        judge = MoAJudge([srv.chat_model("judge")], mode="likelihood", grammar=True)
        with pytest.raises(JudgeError, match="no token log-probabilities"):
            judge.rank("Capital of France?", CANDIDATES)


def rating_alternatives(token: str, body: dict) -> dict[str, float]:
    """At the rating, "7" is written but "9" is nearly as likely; 2 below for the other."""
    if token.strip() != "7":
        return {token: -0.2}
    second = "9 " if "Paris" in body["messages"][-1]["content"] else "2 "
    return {token: math.log(0.5), second: math.log(0.5)}


def test_probability_scoring_reads_the_expected_rating() -> None:
    script = ModelScript(reply="Looks right to me.\nRating: [[ 7 ]]",
                         token_logprobs=rating_alternatives)  # fmt: skip
    with ScriptedOpenAIServer({"judge": script}) as srv:
        written = MoAJudge([srv.chat_model("judge")], mode="pointwise")
        assert written.rank("Capital of France?", CANDIDATES).scores == [7.0, 7.0]
        assert not any(r.body.get("logprobs") for r in srv.requests_for("judge"))

        judge = MoAJudge([srv.chat_model("judge")], mode="pointwise", scoring="probability")
        result = judge.rank("Capital of France?", CANDIDATES)
    assert result.scores == [pytest.approx(8.0), pytest.approx(4.5)]
    assert result.chosen == 0 and result.details["probability_fallbacks"] == 0
    asked = srv.requests_for("judge")[-1].body
    assert asked["logprobs"] is True and asked["top_logprobs"] == 20


def test_probability_scoring_falls_back_to_the_written_verdict() -> None:
    # no logprobs in the answers: the written rating counts, and the fallback is recorded
    with ScriptedOpenAIServer({"judge": ModelScript(reply="Fine.\nRating: [[ 6 ]]")}) as srv:
        judge = MoAJudge([srv.chat_model("judge")], mode="pointwise", scoring="probability")
        result = judge.rank("Capital of France?", CANDIDATES)
    assert result.scores == [6.0, 6.0]
    assert result.details["probability_fallbacks"] == 2


def first_answer_alternatives(token: str, body: dict) -> dict[str, float]:
    if token.strip() != "A":
        return {token: -0.1}
    first = body["messages"][-1]["content"].split("[Answer A]\n")[1]
    p_a = 0.8 if first.startswith("Paris") else 0.3
    return {token: math.log(p_a), "B ": math.log(1 - p_a)}


def test_probability_scoring_pairwise_reads_p_first_wins() -> None:
    # the written verdict is always "A" (pure position bias); the probabilities still order
    script = ModelScript(reply="Both read well. [[ A ]]", token_logprobs=first_answer_alternatives)
    with ScriptedOpenAIServer({"judge": script}) as srv:
        written = MoAJudge([srv.chat_model("judge")], mode="pairwise")
        assert written.rank("Capital?", CANDIDATES).scores == [0.5, 0.5]
        judge = MoAJudge([srv.chat_model("judge")], mode="pairwise", scoring="probability")
        result = judge.rank("Capital?", CANDIDATES)
    # Paris first: P(A) = 0.8; Berlin first: P(A) = 0.3, so Paris wins 0.7 of that order
    assert result.scores == [pytest.approx(0.75), pytest.approx(0.25)]
    assert result.chosen == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass grammar=True"),
        ({"grammar": True, "criteria": ["accuracy"]}, "drop criteria="),
        ({"grammar": True, "scoring": "probability"}, "drop scoring="),
    ],
)
def test_likelihood_settings_that_cannot_apply_are_refused(server, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MoAJudge([server.chat_model("judge")], mode="likelihood", **kwargs)


def test_likelihood_refuses_an_aggregator(server) -> None:
    with pytest.raises(ConfigError, match="drop aggregator="):
        MoAJudge(
            [server.chat_model("judge")], aggregator=server.chat_model("judge"),
            mode="likelihood", grammar=True,
        )  # fmt: skip

"""MoAJudge with fake judges: parsing, swap, aggregation, ties, abstentions, criteria."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from langchain_core.messages import SystemMessage

from langchain_moa.judge import (
    AGGREGATOR_INSTRUCTIONS,
    JudgeError,
    MoAJudge,
    expected_rating,
    filter_criteria,
    first_wins_probability,
    literal_grammar,
    parse_pairwise,
    parse_rating,
)
from langchain_moa.testing import ScriptedChatModel


def fake(reply, **kw) -> ScriptedChatModel:
    return ScriptedChatModel(reply=reply, **kw)


def answer_a(messages) -> str:
    return messages[-1].text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]


def prefers_good(messages) -> str:
    return "A is correct. [[A]]" if "GOOD" in answer_a(messages) else "B is correct. [[B]]"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Reasoning... [[A]]", "A"),
        ("[[B]] at first, but on reflection [[C]]", "C"),
        ("verdict: [[ b ]]".upper(), "B"),
        ("no verdict here", None),
        ("[[D]]", None),
    ],
)
def test_parse_pairwise(text, verdict) -> None:
    assert parse_pairwise(text) == verdict


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("Good. Rating: [[8]]", 8.0),
        ("rating:[[7.5]]", 7.5),
        ("Rating: [[3]] ... revised Rating: [[6]]", 6.0),
        ("[[9]]", 9.0),
        ("Rating: [[11]]", None),
        ("Rating: 8", None),
    ],
)
def test_parse_rating(text, rating) -> None:
    assert parse_rating(text) == rating


@pytest.mark.parametrize("good_position", [0, 1, 2])
def test_swap_cancels_two_position_biased_judges(good_position: int) -> None:
    candidates = ["plain answer", "another plain answer", "filler"]
    candidates[good_position] = "GOOD answer"
    judge = MoAJudge(judges=[fake("[[A]]"), fake("[[A]]"), fake(prefers_good)], swap=True)
    result = judge.rank("question", candidates)
    assert result.chosen == good_position


def test_without_swap_position_bias_wins() -> None:
    judge = MoAJudge(judges=[fake("[[A]]"), fake("[[A]]"), fake(prefers_good)], swap=False)
    result = judge.rank("question", ["plain answer", "GOOD answer"])
    assert result.chosen == 0  # the biased majority picks whatever sits in position A


async def test_async_rank_matches_sync() -> None:
    judge = MoAJudge(judges=[fake("[[A]]"), fake(prefers_good)], swap=True)
    sync = judge.rank("q", ["x", "GOOD y"])
    result = await judge.arank("q", ["x", "GOOD y"])
    assert result.scores == sync.scores and result.chosen == 1


def test_pointwise_mean_rating() -> None:
    def rate(messages) -> str:
        return "Rating: [[9]]" if "GOOD" in messages[-1].text else "Rating: [[2]]"

    judge = MoAJudge(judges=[fake(rate), fake("Rating: [[5]]")], mode="pointwise")
    result = judge.rank("q", ["meh", "GOOD one", "bad"])
    assert result.scores == [3.5, 7.0, 3.5]
    assert result.chosen == 1
    assert result.rejected == 2  # tie between 0 and 2: the highest index is rejected
    assert result.details["ties"]["rejected_tied_with"] == [0]


def test_ties_are_deterministic_and_reported() -> None:
    judge = MoAJudge(judges=[fake("[[C]]")])
    result = judge.rank("q", ["a", "b", "c"])
    assert result.scores == [0.5, 0.5, 0.5]
    assert (result.chosen, result.rejected) == (0, 2)
    assert result.details["ties"]["all_equal"] is True


def test_unparseable_answer_is_reasked_once_then_used() -> None:
    flaky = fake(prefers_good, fail_times=1)
    judge = MoAJudge(judges=[flaky], swap=False)
    result = judge.rank("q", ["GOOD", "bad"])
    assert result.chosen == 0
    assert len(flaky.calls) == 2
    assert result.details["reasked"] == 1 and result.details["abstentions"] == 0


def test_judge_failing_twice_abstains_and_is_recorded() -> None:
    broken = fake("x", fail_always=True, error=RuntimeError("judge down"))
    judge = MoAJudge(judges=[broken, fake(prefers_good)], swap=False)
    result = judge.rank("q", ["bad", "GOOD"])
    assert result.chosen == 1
    abstained = [v for v in result.details["verdicts"] if v["abstained"]]
    assert len(abstained) == 1 and abstained[0]["error"] == "RuntimeError: judge down"
    assert abstained[0]["attempts"] == 2
    assert len(broken.calls) == 2


def test_no_usable_verdict_raises() -> None:
    judge = MoAJudge(judges=[fake("I cannot decide.")])
    with pytest.raises(JudgeError, match="no usable verdict"):
        judge.rank("q", ["a", "b"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2 candidates"):
        MoAJudge(judges=[fake("[[A]]")]).rank("q", ["only one"])
    with pytest.raises(ValueError, match="at least one judge"):
        MoAJudge(judges=[])
    with pytest.raises(ValueError, match="mode must be"):
        MoAJudge(judges=[fake("x")], mode="listwise")  # type: ignore[arg-type]


def test_aggregator_sees_the_judges_reviews_injected() -> None:
    agg = fake(prefers_good)
    judge = MoAJudge(
        judges=[fake("Looks fine [[A]]"), fake("Hmm [[B]]")], aggregator=agg, swap=False
    )
    result = judge.rank("q", ["plain", "GOOD"])
    assert result.chosen == 1  # the aggregator's verdict decides
    (request,) = agg.calls
    system = request[0]
    assert isinstance(system, SystemMessage)
    assert system.text.endswith(
        "\n\n" + AGGREGATOR_INSTRUCTIONS + "\n1. Looks fine [[A]]\n2. Hmm [[B]]"
    )
    assert len(result.details["aggregator_verdicts"]) == 1


@pytest.mark.parametrize("how", ["sync", "async"])
def test_judge_calls_run_concurrently(how: str) -> None:
    judges = [fake("[[A]]", delay=0.3) for _ in range(3)]
    judge = MoAJudge(judges=judges, swap=True)
    started = time.perf_counter()
    if how == "sync":
        judge.rank("q", ["a", "b", "c"])
    else:
        asyncio.run(judge.arank("q", ["a", "b", "c"]))
    # 3 pairs x 2 orders x 3 judges = 18 calls of 0.3 s: 5.4 s one after another
    assert time.perf_counter() - started < 2.0


def test_static_criteria_reach_the_judges() -> None:
    j = fake("[[A]]")
    MoAJudge(judges=[j], criteria=["cites the correct theorem"]).rank("q", ["a", "b"])
    assert "- cites the correct theorem" in j.calls[0][0].text


def test_filter_criteria() -> None:
    kept, dropped = filter_criteria(
        [
            "1. Correctly explains photosynthesis inputs",
            "- Correctly explains photosynthesis inputs.",
            "Keeps the answer concise",
            "Uses markdown formatting",
            "Mentions the stock market",
            "Chlorophyll role is described",
        ],
        "How does photosynthesis work and what role does chlorophyll play?",
    )
    assert kept == ["Correctly explains photosynthesis inputs", "Chlorophyll role is described"]
    reasons = {d["criterion"]: d["reason"] for d in dropped}
    assert reasons["Correctly explains photosynthesis inputs"] == "duplicate"
    assert reasons["Keeps the answer concise"] == "length or style only"
    assert reasons["Uses markdown formatting"] == "length or style only"
    assert reasons["Mentions the stock market"] == "not relevant to the request"


def test_dynamic_criteria_are_proposed_filtered_and_used() -> None:
    proposer = fake("Accuracy of the date\nIs concise\nMentions the treaty name")
    judge_model = fake("[[A]]")
    judge = MoAJudge(judges=[judge_model], criteria="dynamic", criteria_model=proposer)
    result = judge.rank("When was the treaty of Westphalia signed?", ["1648", "1748"])
    info = result.details["criteria"]
    assert info["kept"] == ["Accuracy of the date", "Mentions the treaty name"]
    assert info["dropped"][0]["reason"] == "length or style only"
    assert "- Mentions the treaty name" in judge_model.calls[0][0].text


def test_details_carry_usage_and_raw_verdicts() -> None:
    judge = MoAJudge(judges=[fake("ok [[A]]", input_tokens=3, output_tokens=2)], swap=True)
    result = judge.rank("q", ["a", "b"])
    assert result.details["usage"]["total_tokens"] == 10  # two calls
    assert [v["raw"] for v in result.details["verdicts"]] == [["ok [[A]]"], ["ok [[A]]"]]


def test_batch_forms_rank_each_item() -> None:
    judge = MoAJudge(judges=[fake(prefers_good)], swap=True)
    items = [("q1", ["GOOD a", "b"]), ("q2", ["c", "GOOD d"])]
    assert [r.chosen for r in judge.rank_batch(items)] == [0, 1]
    assert [r.chosen for r in asyncio.run(judge.arank_batch(items))] == [0, 1]


def test_pointwise_candidate_no_judge_rated_abstains_never_scores_zero() -> None:
    def rate(messages) -> str:
        answer = messages[-1].text.split("[Answer]\n")[1]
        return {"good": "Rating: [[9]]", "fair": "Rating: [[4]]"}.get(answer, "I cannot say.")

    judge = MoAJudge(judges=[fake(rate), fake(rate)], mode="pointwise")
    result = judge.rank("q", ["fair", "unclear", "good"])
    assert result.scores == [4.0, None, 9.0]  # on the 1-10 scale, or no score at all
    assert (result.chosen, result.rejected) == (2, 0)  # the unrated one is neither
    assert result.details["unrated"] == [1]
    assert result.details["verdicts"][0]["key"] == {"candidate": 0}


def test_calls_for_plans_a_ranking() -> None:
    judges = [fake("[[A]]"), fake("[[B]]"), fake("[[A]]")]
    assert MoAJudge(judges=judges, aggregator=fake("[[A]]")).calls_for(5) == 80  # 10x2x3+20
    assert MoAJudge(judges=judges, swap=False).calls_for(5) == 30
    assert MoAJudge(judges=judges, mode="pointwise").calls_for(4) == 12
    assert MoAJudge(judges=judges, mode="pointwise", criteria="dynamic").calls_for(4) == 13


# ------------------------------------------------------- token probabilities


def _token(text: str, logprob: float, top: dict[str, float] | None = None) -> dict:
    alternatives = [{"token": t, "logprob": lp} for t, lp in (top or {}).items()]
    return {"token": text, "logprob": logprob, "top_logprobs": alternatives}


def test_expected_rating_weighs_the_rating_tokens() -> None:
    tokens = [_token("Rating: [[", -0.1), _token("3", -1.2, {"3": -1.2, "8": -0.5, "x": -3})]
    p3, p8 = math.exp(-1.2), math.exp(-0.5)
    assert expected_rating(tokens) == pytest.approx((3 * p3 + 8 * p8) / (p3 + p8))


def test_expected_rating_splits_one_into_one_and_ten() -> None:
    # "10" is "1" then "0": P("0") after the "1" moves that share of P("1") to 10
    tokens = [
        _token("[[", -0.1),
        _token("1", math.log(0.6), {"1": math.log(0.6), "9": math.log(0.4)}),
        _token("0", math.log(0.5), {"0": math.log(0.5), "]]": math.log(0.5)}),
    ]
    assert expected_rating(tokens) == pytest.approx(0.3 * 1 + 0.3 * 10 + 0.4 * 9)


def test_verdict_probabilities_need_the_verdict_as_its_own_token() -> None:
    assert expected_rating([_token("[[7]]", -0.1)]) is None  # merged: no position to read
    assert first_wins_probability([_token("no verdict", -0.1)]) is None
    tokens = [_token("[[ ", -0.1), _token("B", math.log(0.6), {"A": math.log(0.2),
                                                               "C": math.log(0.2)})]  # fmt: skip
    assert first_wins_probability(tokens) == pytest.approx((0.2 + 0.1) / 1.0)


@pytest.mark.parametrize(
    ("text", "grammar"),
    [
        ("Paris.", 'root ::= "Paris."'),
        ('say "hi"\\now', 'root ::= "say \\"hi\\"\\\\now"'),
        ("two\nlines\ttab", 'root ::= "two\\nlines\\x09tab"'),
        ("Zürich ✓", 'root ::= "Zürich ✓"'),
    ],
)
def test_literal_grammar_escapes_what_gbnf_needs(text, grammar) -> None:
    assert literal_grammar(text) == grammar


def test_likelihood_rank_on_fake_judges_needs_grammars_and_logprobs() -> None:
    # a fake model neither follows grammars nor returns logprobs: every request abstains
    judge = MoAJudge([fake("Paris.")], mode="likelihood", grammar=True)
    with pytest.raises(JudgeError, match="no token log-probabilities"):
        judge.rank("Capital of France?", ["Paris.", "Berlin."])

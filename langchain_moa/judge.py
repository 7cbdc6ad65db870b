"""`MoAJudge`: an ensemble of LLM judges (optionally MoA-aggregated) that ranks candidates.

MoAA (arXiv 2505.03059) uses an MoA ensemble as the reward model that picks chosen/rejected
pairs for DPO. Here every judge sees every pair of candidates (pairwise mode, MT-Bench style
verdicts ``[[A]]``/``[[B]]``/``[[C]]``) or every candidate alone (pointwise, ``Rating: [[N]]``).

Scoring, so results are easy to audit:

- pairwise: a verdict gives the pair's candidates 1 / 0 / 0.5 points (win / loss / tie). With
  ``swap=True`` each pair is judged in both orders and a judge's vote on the pair is the mean
  of its two verdicts, so a judge that always prefers position A contributes a tie: position
  bias cancels. A candidate's score is its *win rate*: the mean of its points over every
  (pair, judge) vote it took part in. (Not Bradley-Terry: win rates need no fitting and stay
  defined with few votes.)
- pointwise: a candidate's score is the mean rating over the judges (1-10).
- ``scoring="probability"`` reads the judges' token probabilities at the verdict instead of
  the verdict alone (servers that return ``logprobs``: OpenAI, llama.cpp, vLLM): the
  expected rating over the rating tokens, or the probability that the first answer wins
  (``P(A) + P(C) / 2`` over A, B and C). A small model's written verdict is nearly constant
  ("[[1]]" for every answer) while its probabilities still order the answers; AlpacaEval's
  judges read logprobs for the same reason. A verdict without probabilities counts as
  written (recorded in ``details["probability_fallbacks"]``).
- With ``aggregator=`` a model, the judges' full outputs are injected into the aggregator's
  request as numbered references (the same `inject_references` the MoA engine uses) and the
  aggregator's verdict/rating is the one that counts; the judges' own verdicts stay in
  ``details`` for inspection.

A judge whose answer fails or cannot be parsed is asked once more, then counted as an
abstention (recorded). Ties are broken deterministically: ``chosen`` is the lowest index
among the best scores, ``rejected`` the highest index among the worst, and ``details["ties"]``
says when that happened. A rank with no usable verdict at all raises `JudgeError`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig

from langchain_moa.calls import CallResult, ModelCall, sum_usage
from langchain_moa.errors import ConfigError, JudgeError
from langchain_moa.models import model_endpoint, model_label, resolve_model
from langchain_moa.redaction import register_models
from langchain_moa.references import inject_references
from langchain_moa.settings import shown
from langchain_moa.steps import Steps, adrive, drive

Mode = Literal["pairwise", "pointwise", "likelihood"]
Scoring = Literal["verdict", "probability"]

PAIRWISE_INSTRUCTIONS = (
    "You are a careful, impartial reviewer. Below are a user's request and two candidate "
    "answers, A and B. Decide which answer serves the user better: weigh correctness first, "
    "then helpfulness, completeness and clarity. Do not let the order of the answers, their "
    "length or the names of assistants sway you. Give a short justification, then finish "
    "with exactly one verdict on its own line: [[A]] if A is better, [[B]] if B is better, "
    "or [[C]] if they are equally good."
)
POINTWISE_INSTRUCTIONS = (
    "You are a careful, impartial reviewer. Below are a user's request and one candidate "
    "answer. Judge how well the answer serves the user: correctness first, then helpfulness, "
    "completeness and clarity; length alone earns nothing. Give a short justification, then "
    "finish with your score from 1 (useless) to 10 (excellent) on its own line, written "
    "exactly as: Rating: [[N]]"
)
AGGREGATOR_INSTRUCTIONS = (
    "Other reviewers have already assessed this same comparison; their reviews are listed "
    "below, numbered. Some may be wrong or biased. Check their reasoning against the answers "
    "yourself and give your own final verdict in the required format."
)
CRITERIA_INSTRUCTIONS = (
    "Write the criteria a strict expert would use to judge answers to the user request "
    "below: 3 to 6 criteria, one per line, each a short phrase about the substance of a good "
    "answer to this particular request. No numbering commentary, no preamble."
)

#: GBNF grammars that force a short justification followed by the verdict. llama.cpp
#: servers (including the embedded one) accept them as ``extra_body={"grammar": ...}``;
#: they make even a 135M model produce parseable verdicts.
VERDICT_GRAMMARS = {
    "pairwise": 'root ::= reason "\\n[[" [ABC] "]]"\nreason ::= [^\\n\\[]{10,300}',
    "pointwise": (
        'root ::= reason "\\nRating: [[" ([1-9] | "10") "]]"\nreason ::= [^\\n\\[]{10,300}'
    ),
}

_PAIR_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING = re.compile(r"rating\s*:?\s*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
_BARE_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_STYLE_ONLY = re.compile(
    r"\b(length|lengthy|concise|concision|brevity|brief|short|word count|words?|format\w*|"
    r"style|tone|grammar|spelling|markdown|bullet\w*|emoji\w*|politeness|polite)\b",
    re.IGNORECASE,
)
_GENERIC_QUALITY = re.compile(
    r"\b(accura\w*|correct\w*|factual\w*|helpful\w*|complete\w*|relevan\w*|clar\w*|"
    r"reason\w*|logic\w*|safe\w*|depth|insight\w*|evidence|precis\w*|specific\w*|"
    r"practical\w*|actionab\w*|coheren\w*|explain\w*|explanation)\b",
    re.IGNORECASE,
)
_STOPWORDS = set(
    "a an and are as at be but by can do does for from how i in is it me my of on or our "
    "please should so than that the their them then there these this to was we what when "
    "where which who why will with would you your about into give tell write make explain".split()
)


def parse_pairwise(text: str) -> str | None:
    """The last ``[[A]]``/``[[B]]``/``[[C]]`` in `text`, or None."""
    found = _PAIR_VERDICT.findall(text or "")
    return found[-1] if found else None


def parse_rating(text: str) -> float | None:
    """The last ``Rating: [[N]]`` (1-10) in `text` (a bare ``[[N]]`` as fallback), or None."""
    found = _RATING.findall(text or "") or _BARE_RATING.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def _logprob_tokens(message: Any) -> list[dict] | None:
    """The answer's tokens with their ``top_logprobs`` (OpenAI's format), if returned."""
    logprobs = (getattr(message, "response_metadata", None) or {}).get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    return tokens if isinstance(tokens, list) and tokens else None


def _verdict_index(tokens: Sequence[dict]) -> int | None:
    """The index of the token that starts the last verdict (right after its ``[[``)."""
    starts, text = [], ""
    for token in tokens:
        starts.append(len(text))
        text += str(token.get("token", ""))
    at = text.rfind("[[")
    if at < 0:
        return None
    position = at + 2
    while position < len(text) and text[position] == " ":
        position += 1
    return starts.index(position) if position in starts else None  # else: a merged token


def _alternatives(token: dict) -> dict[str, float]:
    """Probability per alternative at one position (the chosen token included), keyed by
    the stripped token text (`` 5`` and ``5`` are the same verdict)."""
    by_token: dict[str, float] = {}
    for alternative in [token, *(token.get("top_logprobs") or [])]:
        text, logprob = alternative.get("token"), alternative.get("logprob")
        if isinstance(text, str) and isinstance(logprob, (int, float)) and math.isfinite(logprob):
            by_token[text] = math.exp(logprob)
    merged: dict[str, float] = {}
    for text, probability in by_token.items():
        merged[text.strip()] = merged.get(text.strip(), 0.0) + probability
    return merged


def expected_rating(tokens: Sequence[dict]) -> float | None:
    """The expected 1-10 rating at the verdict's position, or None without probabilities.

    A "10" is "1" then "0" in most vocabularies: when the chosen token is "1", the next
    position's probability of "0" splits P("1") between 1 and 10.
    """
    index = _verdict_index(tokens)
    if index is None:
        return None
    ratings: dict[int, float] = {}
    for text, probability in _alternatives(tokens[index]).items():
        if text.isdigit() and 1 <= int(text) <= 10:
            ratings[int(text)] = ratings.get(int(text), 0.0) + probability
    if ratings.get(1) and str(tokens[index].get("token", "")).strip() == "1":
        if index + 1 < len(tokens):
            ten = ratings[1] * _alternatives(tokens[index + 1]).get("0", 0.0)
            ratings[1] -= ten
            ratings[10] = ratings.get(10, 0.0) + ten
    total = sum(ratings.values())
    return sum(r * p for r, p in ratings.items()) / total if total > 0 else None


def first_wins_probability(tokens: Sequence[dict]) -> float | None:
    """P(the first answer wins) at the verdict's position: ``(P(A) + P(C) / 2) / (P(A) +
    P(B) + P(C))``, or None without probabilities."""
    index = _verdict_index(tokens)
    if index is None:
        return None
    probs = _alternatives(tokens[index])
    a, b, c = (probs.get(letter, 0.0) for letter in "ABC")
    return (a + c / 2) / (a + b + c) if a + b + c > 0 else None


def _takes_logprobs(model: Any) -> bool:
    """Models with OpenAI's ``logprobs``/``top_logprobs`` request fields (bound or not)."""
    fields = getattr(type(getattr(model, "bound", model)), "model_fields", {})
    return "logprobs" in fields and "top_logprobs" in fields


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 3 and w not in _STOPWORDS}


def filter_criteria(candidates: Sequence[str], prompt: str) -> tuple[list[str], list[dict]]:
    """Keep substantive, relevant, distinct criteria; return (kept, dropped-with-reason)."""
    kept: list[str] = []
    dropped: list[dict] = []
    seen: set[str] = set()
    prompt_words = _words(prompt)
    for raw in candidates:
        text = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", raw).strip().rstrip(".")
        if not text:
            continue
        key = " ".join(re.findall(r"[a-z0-9]+", text.lower()))
        if key in seen:
            dropped.append({"criterion": text, "reason": "duplicate"})
            continue
        if _STYLE_ONLY.search(text) and not _GENERIC_QUALITY.search(text):
            dropped.append({"criterion": text, "reason": "length or style only"})
            continue
        if not (_GENERIC_QUALITY.search(text) or (_words(text) & prompt_words)):
            dropped.append({"criterion": text, "reason": "not relevant to the request"})
            continue
        seen.add(key)
        kept.append(text)
    return kept, dropped


@dataclass
class JudgeResult:
    """The outcome of ranking candidates for one prompt."""

    scores: list[float | None]
    """Per candidate; None when no judge rated it (an abstention, never a low score)."""
    chosen: int
    rejected: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Request:
    """One judge request (a pair in one order, or one candidate) and its attempts."""

    judge: int  # index into judges; -1 = the aggregator
    key: tuple  # ("pair", i, j, order) or ("point", i)
    messages: list[BaseMessage]
    raw: list[str] = field(default_factory=list)
    parsed: Any = None
    soft: float | None = None
    """With probability scoring: the expected rating, or P(first answer wins)."""
    forced: str | None = None
    """Likelihood mode: the candidate the judge's answer is forced to (its grammar)."""
    error: str | None = None
    usage: list[Any] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        """A usable verdict, or asked twice (then it counts as an abstention)."""
        return self.parsed is not None or len(self.raw) >= 2


# ------------------------------------------------------------------------ modes


class PairwiseMode:
    """Every pair of candidates, MT-Bench style verdicts; scores are win rates."""

    name = "pairwise"
    instructions = PAIRWISE_INSTRUCTIONS
    scoring = "win rate"
    min_candidates = 2

    def requests(self, prompt: str, candidates: Sequence[str], swap: bool) -> list[tuple]:
        """(key, user text) for each pair, in both orders when `swap`."""
        found = []
        for i, j in itertools.combinations(range(len(candidates)), 2):
            orders = [(i, j, 0), (j, i, 1)] if swap else [(i, j, 0)]
            for a, b, order in orders:
                body = (
                    "[User request]\n" + prompt + "\n\n[Answer A]\n" + candidates[a]
                    + "\n\n[Answer B]\n" + candidates[b]
                )  # fmt: skip
                found.append((("pair", i, j, order), body))
        return found

    def parse(self, text: str) -> str | None:
        return parse_pairwise(text)

    def soft(self, tokens: Sequence[dict]) -> float | None:
        return first_wins_probability(tokens)

    def describe_key(self, key: tuple) -> dict[str, Any]:
        """A request's key for records (one shape per mode, so tables type it once)."""
        _, i, j, order = key
        return {"first": i, "second": j, "swapped": bool(order)}

    def points(self, deciding: Sequence[_Request], n: int) -> list[list[float]]:
        """Per candidate, the points of every (pair, judge) vote it took part in."""
        points: list[list[float]] = [[] for _ in range(n)]
        votes: dict[tuple, list[float]] = {}  # (judge, i, j) -> points for i, per order
        for request in deciding:
            if request.parsed is None:
                continue
            _, i, j, order = request.key
            winner_first = (
                request.soft
                if request.soft is not None
                else {"A": 1.0, "B": 0.0, "C": 0.5}[request.parsed]
            )
            votes.setdefault((request.judge, i, j), []).append(
                winner_first if order == 0 else 1.0 - winner_first
            )
        for (_judge, i, j), per_order in votes.items():
            vote = sum(per_order) / len(per_order)
            points[i].append(vote)
            points[j].append(1.0 - vote)
        return points


class PointwiseMode:
    """Every candidate alone, rated 1-10; scores are mean ratings."""

    name = "pointwise"
    instructions = POINTWISE_INSTRUCTIONS
    scoring = "mean rating"
    min_candidates = 1

    def requests(self, prompt: str, candidates: Sequence[str], swap: bool) -> list[tuple]:
        return [
            (("point", i), "[User request]\n" + prompt + "\n\n[Answer]\n" + candidate)
            for i, candidate in enumerate(candidates)
        ]

    def parse(self, text: str) -> float | None:
        return parse_rating(text)

    def soft(self, tokens: Sequence[dict]) -> float | None:
        return expected_rating(tokens)

    def describe_key(self, key: tuple) -> dict[str, Any]:
        return {"candidate": key[1]}

    def points(self, deciding: Sequence[_Request], n: int) -> list[list[float]]:
        points: list[list[float]] = [[] for _ in range(n)]
        for request in deciding:
            if request.parsed is not None:
                value = request.soft if request.soft is not None else request.parsed
                points[request.key[1]].append(float(value))
        return points


class LikelihoodMode(PointwiseMode):
    """Every candidate alone, as the judge's own reply to the request; scores are the judge's
    mean log-probability per token of writing it.

    A small model cannot write a useful verdict, but the probability it gives an answer is
    the signal evaluation harnesses score small models by (lm-eval's multiple-choice
    log-likelihood): it prefers "Paris" to "Berlin" as the capital of France long before it
    can explain why. The judge is asked the user's request with no instructions, and a
    grammar forces its answer to be the candidate, token by token; llama.cpp reports each
    token's probability before the grammar applies, which is what is scored. Per token, so a
    longer answer is not penalised for its length alone. llama.cpp servers only (grammars).
    """

    name = "likelihood"
    instructions = None
    scoring = "mean token log-probability"
    min_candidates = 1

    def requests(self, prompt: str, candidates: Sequence[str], swap: bool) -> list[tuple]:
        return [(("point", i), prompt) for i in range(len(candidates))]

    def parse(self, text: str) -> float | None:  # scored from token probabilities instead
        return None

    def soft(self, tokens: Sequence[dict]) -> float | None:
        return None


def literal_grammar(text: str) -> str:
    """A GBNF grammar whose only sentence is `text` (escaped as GBNF string literals want)."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\x{ord(char):02X}")
        else:
            escaped.append(char)
    return 'root ::= "' + "".join(escaped) + '"'


def answer_likelihood(message: Any, candidate: str) -> tuple[float | None, str | None]:
    """(mean log-probability per token of `candidate`, None), or (None, why not)."""
    if message.text != candidate:
        return None, (
            "the judge did not write the candidate back (likelihood needs a llama.cpp server, "
            "which follows grammars, and enough max_tokens)"
        )
    tokens = _logprob_tokens(message)
    values = [t.get("logprob") for t in tokens or []]
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None, "the judge returned no token log-probabilities (needs logprobs support)"
    return sum(values) / len(values), None


MODES: dict[str, PairwiseMode | PointwiseMode] = {
    "pairwise": PairwiseMode(),
    "pointwise": PointwiseMode(),
    "likelihood": LikelihoodMode(),
}


def _prompt_text(prompt: str | Sequence[BaseMessage] | Sequence[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    lines = []
    for m in prompt:
        role = m.get("role") if isinstance(m, dict) else m.type
        content = m.get("content") if isinstance(m, dict) else m.text
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


def _check_likelihood(grammar: bool, aggregator: Any, criteria: Any, scoring: str) -> None:
    """Likelihood mode reads the judges' probabilities of each candidate, nothing else."""
    if not grammar:
        raise ConfigError(
            "mode='likelihood' forces each judge's answer to the candidate with a llama.cpp "
            "grammar: pass grammar=True (llama.cpp servers only, e.g. the embedded model)"
        )
    for name, value in (("aggregator", aggregator), ("criteria", criteria)):
        if value:
            raise ConfigError(
                f"mode='likelihood' has no verdicts to aggregate or criteria to weigh: "
                f"drop {name}= or use mode='pairwise' or 'pointwise'"
            )
    if scoring != "verdict":
        raise ConfigError(
            "mode='likelihood' always scores by token probabilities: drop scoring= (it "
            "applies to pairwise and pointwise verdicts)"
        )


def _as_model(spec: Any, role: str) -> Any:
    """Chat models, bound chat models (``model.bind(...)``) or init_chat_model strings."""
    if isinstance(spec, Runnable) and not isinstance(spec, BaseChatModel):
        return spec
    return resolve_model(spec, role=role)


class MoAJudge:
    """An ensemble judge that scores candidate answers to a prompt."""

    def __init__(
        self,
        judges: Sequence[BaseChatModel | str],
        aggregator: BaseChatModel | str | None = None,
        mode: Mode = "pairwise",
        swap: bool = True,
        criteria: Sequence[str] | Literal["dynamic"] | None = None,
        criteria_model: BaseChatModel | str | None = None,
        max_concurrency: int | None = None,
        grammar: bool = False,
        scoring: Scoring = "verdict",
        top_logprobs: int = 20,
    ) -> None:
        """Build the judge.

        Args:
            judges: the judge models (chat models or ``init_chat_model`` strings).
            aggregator: re-judges with the judges' reviews in view; its verdict counts.
            mode: ``"pairwise"`` (win rates over every pair), ``"pointwise"`` (1-10) or
                ``"likelihood"`` (the judges' mean token log-probability of each candidate;
                needs ``grammar=True``; the embedded model's default, see `LikelihoodMode`).
            swap: pairwise only: judge each pair in both orders (cancels position bias).
            criteria: criteria to weigh, ``"dynamic"`` (written per prompt) or None.
            criteria_model: writes dynamic criteria (default: the aggregator or judge 1).
            max_concurrency: judge calls at once (default: ``config["max_concurrency"]``).
            grammar: constrain every answer with `VERDICT_GRAMMARS` (llama.cpp servers
                only, e.g. the embedded model), so even a 135M model gives a verdict.
            scoring: ``"verdict"`` counts the written verdict; ``"probability"`` reads the
                token probabilities at the verdict (see the module docstring) where the
                model returns them (OpenAI-compatible models), the verdict elsewhere.
            top_logprobs: alternatives asked for per token with ``"probability"`` (OpenAI
                allows at most 20).
        """
        if not judges:
            raise ConfigError("MoAJudge needs at least one judge model: judges=[...]")
        if mode not in MODES:
            raise ConfigError(
                f"mode must be 'pairwise', 'pointwise' or 'likelihood', got {shown(mode)}"
            )
        if isinstance(criteria, str) and criteria != "dynamic":
            raise ConfigError("criteria must be a list of strings, 'dynamic' or None")
        if scoring not in ("verdict", "probability"):
            raise ConfigError(f"scoring must be 'verdict' or 'probability', got {shown(scoring)}")
        if (
            isinstance(top_logprobs, bool)
            or not isinstance(top_logprobs, int)
            or not (1 <= top_logprobs <= 20)
        ):
            raise ConfigError(
                f"top_logprobs must be an integer from 1 to 20, got {shown(top_logprobs)}"
            )
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigError(
                f"max_concurrency must be at least 1 or None, got {shown(max_concurrency)}"
            )
        if mode == "likelihood":
            _check_likelihood(grammar, aggregator, criteria, scoring)
        self.judges = [_as_model(j, f"judge {i + 1}") for i, j in enumerate(judges)]
        self.aggregator = _as_model(aggregator, "aggregator") if aggregator else None
        self.mode: Mode = mode
        self.swap = swap
        self.criteria = criteria
        self.criteria_model = (
            _as_model(criteria_model, "criteria_model")
            if criteria_model
            else (self.aggregator or self.judges[0])
        )
        self.max_concurrency = max_concurrency
        self.grammar = grammar
        self.scoring: Scoring = scoring
        self.top_logprobs = top_logprobs
        register_models([*self.judges, self.aggregator, self.criteria_model])

    def __repr__(self) -> str:
        names = ", ".join(model_label(j) for j in self.judges)
        agg = model_label(self.aggregator) if self.aggregator else None
        return (
            f"MoAJudge(judges=[{names}], aggregator={agg}, mode={self.mode!r}, "
            f"swap={self.swap}, scoring={self.scoring!r})"
        )

    @property
    def _mode(self) -> PairwiseMode | PointwiseMode:
        return MODES[self.mode]

    def _scorers(self) -> list[int]:
        """The judges asked in likelihood mode: one per distinct model and server. Greedy
        forced answers ignore sampling settings, so the local recipe's three seeds of one
        model would score every candidate three times alike."""
        seen: dict[tuple, int] = {}
        for k, judge in enumerate(self.judges):
            base = getattr(judge, "bound", judge)
            seen.setdefault((type(base).__name__, model_label(judge), model_endpoint(judge)), k)
        return list(seen.values())

    def calls_for(self, candidates: int) -> int:
        """Model calls to rank `candidates` answers, first attempts only (for planning)."""
        per_judge = len(self._mode.requests("", [""] * candidates, self.swap))
        asked = len(self._scorers()) if self.mode == "likelihood" else len(self.judges)
        total = per_judge * asked
        if self.aggregator is not None:
            total += per_judge
        return total + (1 if self.criteria == "dynamic" else 0)

    # ---------------------------------------------------------------- requests
    def _system(self, criteria: list[str]) -> str:
        text = self._mode.instructions
        if criteria:
            text += "\n\nWeigh these criteria in particular:" + "".join(
                f"\n- {c}" for c in criteria
            )
        return text

    def _requests(
        self, prompt: str, candidates: Sequence[str], criteria: list[str]
    ) -> list[_Request]:
        if self.mode == "likelihood":
            return [
                _Request(k, key, [HumanMessage(body)], forced=candidates[key[1]])
                for key, body in self._mode.requests(prompt, candidates, self.swap)
                for k in self._scorers()
            ]
        system = self._system(criteria)
        return [
            _Request(k, key, [SystemMessage(system), HumanMessage(body)])
            for key, body in self._mode.requests(prompt, candidates, self.swap)
            for k in range(len(self.judges))
        ]

    def _aggregator_requests(self, requests: list[_Request]) -> list[_Request]:
        """One aggregator request per pair-order / candidate, judges' reviews injected."""
        grouped: dict[tuple, list[_Request]] = {}
        for request in requests:
            grouped.setdefault(request.key, []).append(request)
        result = []
        for key, group in grouped.items():
            reviews = [r.raw[-1].strip() for r in group if r.parsed is not None and r.raw]
            if reviews:
                messages = inject_references(group[0].messages, reviews, AGGREGATOR_INSTRUCTIONS)
                result.append(_Request(-1, key, messages))
        return result

    # ----------------------------------------------------------------- running
    def _call(self, request: _Request) -> ModelCall:
        """The call-layer request: hidden from message streams, named in errors."""
        model = self.aggregator if request.judge < 0 else self.judges[request.judge]
        options: dict[str, Any] = {}
        if request.forced is not None:
            # greedy, so the grammar's path is the tokenizer's usual split of the text; a
            # token is at least one byte, so the cap never cuts the candidate off
            options.update(
                extra_body={"grammar": literal_grammar(request.forced)},
                logprobs=True, top_logprobs=1, temperature=0,
                max_tokens=len(request.forced.encode("utf-8")) + 16,
            )  # fmt: skip
        elif self.grammar:
            options["extra_body"] = {"grammar": VERDICT_GRAMMARS[self.mode]}
        if self.scoring == "probability" and _takes_logprobs(model):
            options.update(logprobs=True, top_logprobs=self.top_logprobs)
        if options:
            model = model.bind(**options)  # type: ignore[union-attr]
        role = "judge aggregator" if request.judge < 0 else f"judge {request.judge + 1}"
        return ModelCall(
            model=model,
            messages=request.messages,
            role=role,
            kind="judge",
            metadata={"moa_judge": request.judge, "moa_judge_key": list(request.key)},
        )

    def _record(self, request: _Request, result: CallResult) -> None:
        if result.error is not None:
            request.raw.append("")
            request.error = result.error.reason
            return
        assert result.message is not None
        request.raw.append(result.message.text)
        request.usage.append(result.message.usage_metadata)
        if request.forced is not None:
            request.parsed, request.error = answer_likelihood(result.message, request.forced)
            return
        request.parsed = self._mode.parse(result.message.text)
        request.error = None if request.parsed is not None else "unparseable verdict"
        request.soft = None
        if self.scoring == "probability" and request.parsed is not None:
            tokens = _logprob_tokens(result.message)
            request.soft = self._mode.soft(tokens) if tokens else None

    def _ask(self, requests: list[_Request]) -> Steps[None]:
        """Ask every request; ask the unsettled ones once more (then they abstain)."""
        while pending := [r for r in requests if not r.settled]:
            results = yield [self._call(r) for r in pending]
            for request, result in zip(pending, results, strict=True):
                self._record(request, result)

    # ---------------------------------------------------------------- criteria
    def _criteria_call(self, prompt: str) -> ModelCall:
        return ModelCall(
            model=self.criteria_model,
            messages=[
                SystemMessage(CRITERIA_INSTRUCTIONS),
                HumanMessage("[User request]\n" + prompt),
            ],
            role="criteria model",
            kind="judge",
        )

    def _criteria_from(self, text: str, prompt: str) -> tuple[list[str], dict]:
        proposed = [line for line in text.splitlines() if line.strip()]
        kept, dropped = filter_criteria(proposed, prompt)
        return kept, {"proposed": proposed, "kept": kept, "dropped": dropped}

    def _static_criteria(self) -> tuple[list[str], dict]:
        given = list(self.criteria) if isinstance(self.criteria, (list, tuple)) else []
        return given, {"given": given}

    # ----------------------------------------------------------------- scoring
    def _validate(self, candidates: Sequence[str]) -> None:
        needed = self._mode.min_candidates
        if len(candidates) < needed:
            plural = "s" if needed > 1 else ""
            raise ValueError(
                f"{self.mode} judging needs at least {needed} candidate{plural}, "
                f"got {len(candidates)}"
            )
        for i, c in enumerate(candidates):
            if not isinstance(c, str):
                raise ValueError(f"candidate {i} must be a string, got {type(c).__name__}")

    def _result(
        self,
        candidates: Sequence[str],
        requests: list[_Request],
        agg_requests: list[_Request],
        criteria_info: dict,
    ) -> JudgeResult:
        deciding = agg_requests if self.aggregator is not None else requests
        n = len(candidates)
        points = self._mode.points(deciding, n)
        if sum(len(p) for p in points) == 0:
            errors = sorted({r.error for r in [*requests, *agg_requests] if r.error})
            raise JudgeError(
                f"no usable verdict from {len(self.judges)} judge(s) on {n} candidates: "
                + ("; ".join(errors) or "no answers")
            )
        # a candidate no judge rated abstains (None): it is never chosen or rejected
        scores: list[float | None] = [sum(p) / len(p) if p else None for p in points]
        rated = [(i, s) for i, s in enumerate(scores) if s is not None]
        best, worst = max(s for _, s in rated), min(s for _, s in rated)
        chosen = min(i for i, s in rated if s == best)
        rejected = max(i for i, s in rated if s == worst)
        ties = {
            "chosen_tied_with": [i for i, s in rated if s == best and i != chosen],
            "rejected_tied_with": [i for i, s in rated if s == worst and i != rejected],
            "all_equal": best == worst,
        }

        def describe(request: _Request) -> dict[str, Any]:
            judge = "aggregator" if request.judge < 0 else request.judge
            model = model_label(
                self.aggregator if request.judge < 0 else self.judges[request.judge]
            )
            return {
                "judge": judge, "model": model, "key": self._mode.describe_key(request.key),
                "verdict": request.parsed, "probability_score": request.soft,
                "raw": request.raw, "attempts": len(request.raw),
                "error": request.error, "abstained": request.parsed is None,
            }  # fmt: skip

        everything = requests + agg_requests
        return JudgeResult(
            scores=scores,
            chosen=chosen,
            rejected=rejected,
            details={
                "mode": self.mode,
                "swap": self.swap,
                "scoring": (
                    f"{self._mode.scoring} (token probabilities)"
                    if self.scoring == "probability"
                    else self._mode.scoring
                ),
                "probability_fallbacks": (
                    sum(r.parsed is not None and r.soft is None for r in deciding)
                    if self.scoring == "probability"
                    else 0
                ),
                "votes_per_candidate": [len(p) for p in points],
                "unrated": [i for i, s in enumerate(scores) if s is None],
                "verdicts": [describe(r) for r in requests],
                "aggregator_verdicts": [describe(r) for r in agg_requests],
                "abstentions": sum(r.parsed is None for r in everything),
                "reasked": sum(len(r.raw) > 1 for r in everything),
                "ties": ties,
                "criteria": criteria_info,
                "usage": sum_usage([u for r in everything for u in r.usage]),
            },
        )

    # --------------------------------------------------------------- public API
    def _rank_steps(
        self, prompt: str | Sequence[Any], candidates: Sequence[str]
    ) -> Steps[JudgeResult]:
        """Ranking as steps: the criteria call (dynamic criteria; its failure raises
        `CallError`), the judges' requests, then the aggregator's requests."""
        self._validate(candidates)
        text = _prompt_text(prompt)
        criteria, info = self._static_criteria()
        if self.criteria == "dynamic":
            reply = yield self._criteria_call(text)
            criteria, info = self._criteria_from(reply.text, text)
        requests = self._requests(text, candidates, criteria)
        yield from self._ask(requests)
        agg_requests = self._aggregator_requests(requests) if self.aggregator is not None else []
        yield from self._ask(agg_requests)
        return self._result(candidates, requests, agg_requests, info)

    def rank(
        self,
        prompt: str | Sequence[Any],
        candidates: Sequence[str],
        config: RunnableConfig | None = None,
    ) -> JudgeResult:
        """Score `candidates` for `prompt` (sync; judge calls run concurrently in threads).

        `config` parents the judge calls (callbacks, tags) and may set ``max_concurrency``
        (``max_concurrency=`` given to the judge wins).
        """
        steps = self._rank_steps(prompt, candidates)
        return drive(steps, config, max_concurrency=self.max_concurrency)

    async def arank(
        self,
        prompt: str | Sequence[Any],
        candidates: Sequence[str],
        config: RunnableConfig | None = None,
    ) -> JudgeResult:
        """Async `rank`: judge calls run concurrently as asyncio tasks."""
        steps = self._rank_steps(prompt, candidates)
        return await adrive(steps, config, max_concurrency=self.max_concurrency)

    def rank_batch(self, items: Sequence[tuple[Any, Sequence[str]]]) -> list[JudgeResult]:
        return [self.rank(prompt, candidates) for prompt, candidates in items]

    async def arank_batch(self, items: Sequence[tuple[Any, Sequence[str]]]) -> list[JudgeResult]:
        return list(await asyncio.gather(*(self.arank(p, c) for p, c in items)))

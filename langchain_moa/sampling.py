"""Candidate sampling: n answers from a policy model, each at its own seed (and temperature).

Used by the DPO pipeline (`moa label --policy`) and by the judge graph.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import convert_to_messages
from langchain_core.runnables import RunnableConfig

from langchain_moa.calls import CallResult, ModelCall
from langchain_moa.steps import Steps, adrive

SAMPLE_TEMPERATURES = (0.6, 1.2)
"""Without a temperature, sample i of n is drawn at one spread evenly over this range."""


def _sample_calls(
    policy: Any, messages: list[dict[str, Any]], samples: int, temperature: float | None = None
) -> list[ModelCall]:
    """One hidden call per sample: `policy` at `temperature` (default: spread over
    `SAMPLE_TEMPERATURES`), each sample with its own seed."""
    conversation = convert_to_messages(messages)
    low, high = SAMPLE_TEMPERATURES
    found = []
    for i in range(samples):
        if temperature is None:
            at = round(low + (high - low) * i / max(1, samples - 1), 2)
        else:
            at = temperature
        try:
            model = policy.bind(temperature=at, seed=1000 + i)
        except Exception:  # a model without those options still gives samples
            model = policy
        found.append(
            ModelCall(
                model=model,
                messages=conversation,
                role=f"sample {i + 1}",
                kind="sample",
                metadata={"moa_sample": i},
            )
        )
    return found


def _answers(results: list[CallResult]) -> list[str]:
    """Non-empty sampled answers; raises the first error when no sample answered."""
    answers = [r.message.text.strip() for r in results if r.message is not None]
    answers = [a for a in answers if a]
    if not answers and any(r.error for r in results):
        raise next(r.error for r in results if r.error)  # type: ignore[misc]
    return answers


def sample_steps(
    policy: Any, messages: list[dict[str, Any]], samples: int, temperature: float | None = None
) -> Steps[list[str]]:
    """`samples` answers from `policy`, concurrently (non-empty ones only), at `temperature`
    (default: spread over `SAMPLE_TEMPERATURES`), as steps (`steps.drive` / `adrive`)."""
    return _answers((yield _sample_calls(policy, messages, samples, temperature)))


async def sample_candidates(
    policy: Any,
    messages: list[dict[str, Any]],
    samples: int,
    config: RunnableConfig | None = None,
    *,
    temperature: float | None = None,
) -> list[str]:
    """`sample_steps` on the async call layer."""
    return await adrive(sample_steps(policy, messages, samples, temperature), config)

"""LangChain's standard unit-test suite for ChatMoA (no test overridden)."""

from __future__ import annotations

from langchain_openai import ChatOpenAI
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_moa import ChatMoA


def _openai(name: str) -> ChatOpenAI:
    # Never contacted by the unit suite; a loopback address keeps it that way.
    return ChatOpenAI(model=name, api_key="sk-unit-test", base_url="http://127.0.0.1:9/v1")


class TestChatMoAStandardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatMoA]:
        return ChatMoA

    @property
    def chat_model_params(self) -> dict:
        return {
            "proposers": [_openai("proposer-a"), _openai("proposer-b")],
            "aggregator": _openai("aggregator"),
            "layers": 2,
        }

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        # Keys come from the environment through the member models, never from ChatMoA.
        return (
            {"OPENAI_API_KEY": "sk-from-env", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
            {
                "proposers": ["openai:proposer-a", "openai:proposer-b"],
                "aggregator": "openai:aggregator",
                "layers": 2,
            },
            {"layers": 2, "min_proposers": 1},
        )

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

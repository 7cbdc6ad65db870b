"""LangChain's standard integration suite for ChatMoA, over real HTTP.

Proposers and aggregator are `ChatOpenAI` clients talking to the scripted
OpenAI-compatible server on 127.0.0.1, exactly as users talk to remote providers.
No test of the suite is overridden.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_moa import ChatMoA
from langchain_moa.testing import ModelScript, ScriptedOpenAIServer

pytestmark = pytest.mark.http


@pytest.fixture(scope="module", autouse=True)
def scripted_server() -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "proposer-a": ModelScript(latency=0.01),
        "proposer-b": ModelScript(latency=0.02),
        "aggregator": ModelScript(latency=0.01, token_delay=0.001),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        TestChatMoAStandardIntegration.server = server
        yield server


class TestChatMoAStandardIntegration(ChatModelIntegrationTests):
    server: ScriptedOpenAIServer

    @property
    def chat_model_class(self) -> type[ChatMoA]:
        return ChatMoA

    @property
    def chat_model_params(self) -> dict:
        return {
            "proposers": [
                self.server.chat_model("proposer-a", max_retries=0),
                self.server.chat_model("proposer-b", max_retries=0),
            ],
            "aggregator": self.server.chat_model("aggregator", max_retries=0),
            "layers": 2,
        }

    @property
    def enable_vcr_tests(self) -> bool:
        # test_stream_time replays a cassette recorded against the scripted server
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "aggregator-override"

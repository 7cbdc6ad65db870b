"""LangChain's standard integration suite for ChatMoA, over real HTTP.

Proposers and aggregator are `ChatOpenAI` clients talking to the scripted
OpenAI-compatible server on 127.0.0.1, exactly as users talk to remote providers.
No test of the suite is overridden.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_moa.testing import ModelScript, ScriptedOpenAIServer
from tests.support import ChatMoAStandardTests

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


class TestChatMoAStandardIntegration(ChatMoAStandardTests, ChatModelIntegrationTests):
    server: ScriptedOpenAIServer

    def member(self, name: str) -> BaseChatModel:
        return self.server.chat_model(name, max_retries=0)

    @property
    def enable_vcr_tests(self) -> bool:
        # test_stream_time replays a cassette recorded against the scripted server
        return True

"""LangChain's standard unit-test suite for ChatMoA (no test overridden, one added)."""

from __future__ import annotations

import json
import os
from unittest import mock

from langchain_openai import ChatOpenAI
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import SecretStr

from tests.support import ChatMoAStandardTests

ENV_KEY = "sk-from-env-0123456789"
ENV_BASE_URL = "http://127.0.0.1:9/v1"


class TestChatMoAStandardUnit(ChatMoAStandardTests, ChatModelUnitTests):
    def member(self, name: str) -> ChatOpenAI:
        # Never contacted by the unit suite; a loopback address keeps it that way.
        return ChatOpenAI(model=name, api_key="sk-unit-test", base_url="http://127.0.0.1:9/v1")

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        # Keys come from the environment through the member models, never into ChatMoA's
        # own `api_key`: that one is handed to every member, and an OPENAI_API_KEY picked up
        # there would be sent to members of any provider. What the members get is checked
        # by `test_init_from_env_reaches_every_member`.
        return (
            {"OPENAI_API_KEY": ENV_KEY, "OPENAI_BASE_URL": ENV_BASE_URL},
            {
                "proposers": ["openai:proposer-a", "openai:proposer-b"],
                "aggregator": "openai:aggregator",
                "layers": 2,
            },
            {"api_key": None},
        )

    def test_init_from_env_reaches_every_member(self) -> None:
        """`init_from_env` for a model made of models: every member given as a string is
        built with the environment's key (a `SecretStr`) and endpoint, read at construction,
        and the key shows in no repr, str or dump of the MoA."""
        env, params, _ = self.init_from_env_params
        with mock.patch.dict(os.environ, env):
            moa = self.chat_model_class(**params)
        members = [*moa.proposers, moa.aggregator]  # checked outside the environment
        assert [m.model_name for m in members] == ["proposer-a", "proposer-b", "aggregator"]
        for member in members:
            assert isinstance(member, ChatOpenAI)
            assert isinstance(member.openai_api_key, SecretStr)
            assert member.openai_api_key.get_secret_value() == ENV_KEY
            assert str(member.root_client.base_url).rstrip("/") == ENV_BASE_URL
        shown = [repr(moa), str(moa), moa.model_dump_json(), json.dumps(moa._identifying_params)]
        assert not [text for text in shown if ENV_KEY in text]

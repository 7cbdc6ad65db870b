"""Test helpers: a scripted OpenAI-compatible loopback server and fake chat models."""

from langchain_moa.testing.fakes import ScriptedChatModel
from langchain_moa.testing.server import (
    API_KEY,
    ModelScript,
    RecordedRequest,
    ScriptedOpenAIServer,
    smart_reply,
)

__all__ = [
    "API_KEY",
    "ModelScript",
    "RecordedRequest",
    "ScriptedChatModel",
    "ScriptedOpenAIServer",
    "smart_reply",
]

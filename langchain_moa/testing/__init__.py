"""Test helpers: a scripted OpenAI-compatible loopback server and fake chat models."""

from langchain_moa.testing.fakes import ScriptedChatModel
from langchain_moa.testing.server import (
    API_KEY,
    ModelScript,
    RecordedRequest,
    ScriptedOpenAIServer,
    free_port,
    serve_in_subprocess,
    smart_reply,
    start_moa_serve,
)

__all__ = [
    "API_KEY",
    "ModelScript",
    "RecordedRequest",
    "ScriptedChatModel",
    "ScriptedOpenAIServer",
    "free_port",
    "serve_in_subprocess",
    "smart_reply",
    "start_moa_serve",
]

"""One error vocabulary (`langchain_moa.errors`), classified by type, `ConfigError` everywhere."""

from __future__ import annotations

import ast
import inspect
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import langchain_moa
from langchain_moa import ConfigError, MoAJudge, build_judge_graph, errors
from langchain_moa.calls import CallResult, ModelCall
from langchain_moa.data.runner import _Watch
from langchain_moa.errors import is_transient_error
from langchain_moa.shielding import call_error
from langchain_moa.testing.fakes import ScriptedChatModel

REQUEST = httpx.Request("POST", "https://api.example.com/v1/chat/completions")


def status_error(cls: type[openai.APIStatusError], status: int) -> openai.APIStatusError:
    return cls("rejected", response=httpx.Response(status, request=REQUEST), body=None)


# ------------------------------------------------------------------ vocabulary


def test_every_exception_is_defined_in_errors_and_exported_at_the_top_level() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }  # fmt: skip
    assert defined == {
        "CallError", "ConfigError", "ConstrainedOutputError", "JudgeError",
        "LocalModelNotFoundError", "MoAError", "OutputBusy", "RunInterrupted", "RunStopped",
    }  # fmt: skip
    for name in defined:
        assert getattr(langchain_moa, name) is getattr(errors, name)
        assert name in langchain_moa.__all__


def test_the_old_import_paths_still_work() -> None:
    from langchain_moa.calls import CallError
    from langchain_moa.constrained import ConstrainedOutputError
    from langchain_moa.judge import JudgeError
    from langchain_moa.local import LocalModelNotFoundError
    from langchain_moa.pipelines import OutputBusy, RunInterrupted, RunStopped

    assert (CallError, ConstrainedOutputError, JudgeError, LocalModelNotFoundError) == (
        errors.CallError, errors.ConstrainedOutputError, errors.JudgeError,
        errors.LocalModelNotFoundError,
    )  # fmt: skip
    assert (OutputBusy, RunInterrupted, RunStopped) == (
        errors.OutputBusy, errors.RunInterrupted, errors.RunStopped,
    )  # fmt: skip


def test_no_other_module_defines_a_public_exception() -> None:
    """Private control-flow signals (a server's 4xx, a cancelled chat turn) may stay local."""
    package = Path(langchain_moa.__file__).parent
    for path in package.rglob("*.py"):  # the cli/ and data/ packages too
        if path.name == "errors.py":
            continue
        module = ".".join(path.relative_to(package).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", "")).endswith(("Error", "Exception"))
                for base in node.bases
            ):
                public = not node.name.startswith("_") and node.name in getattr(
                    __import__(f"langchain_moa.{module}", fromlist=["*"]), "__all__", ()
                )
                assert not public, f"{path.name} defines the public exception {node.name}"


def test_errors_imports_nothing_from_the_package() -> None:
    """Every module may import `errors`; it imports none of them (no circle, not even for
    type checking)."""
    tree = ast.parse(inspect.getsource(errors))
    imported = [
        node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    ] + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
         for alias in node.names]  # fmt: skip
    assert not [name for name in imported if name.startswith("langchain_moa")]


# --------------------------------------------------------------- classification


class RateLimitError(Exception):
    """Not a provider's error, only named like one."""


class MyAuthenticationError(RuntimeError):
    """Not a provider's error, only named like one."""


def _langchain_core_error(name: str) -> type[Exception]:
    import langchain_core.exceptions as core

    cls = getattr(core, name, None)
    if cls is None:  # langchain-core before the model error classes
        pytest.skip(f"langchain-core has no {name}")
    return cls


@pytest.mark.parametrize(
    ("make", "transient"),
    [
        (lambda: RateLimitError("slow down"), False),  # a name is not a type
        (lambda: MyAuthenticationError("nope"), False),
        (lambda: _langchain_core_error("ModelRateLimitError")("slow down"), True),
        (lambda: _langchain_core_error("ModelConnectionError")("refused"), True),
        (lambda: _langchain_core_error("ModelTimeoutError")("slow"), True),
        (lambda: _langchain_core_error("ModelAuthenticationError")("bad key"), False),
        (lambda: openai.APIConnectionError(request=REQUEST), True),  # langchain-openai 1.0
        (lambda: httpx.ReadTimeout("slow"), True),
        (lambda: status_error(openai.RateLimitError, 429), True),
        (lambda: status_error(openai.AuthenticationError, 401), False),
    ],
    ids=[
        "look-alike RateLimitError", "look-alike AuthenticationError", "ModelRateLimitError",
        "ModelConnectionError", "ModelTimeoutError", "ModelAuthenticationError",
        "APIConnectionError", "httpx.ReadTimeout", "RateLimitError", "AuthenticationError",
    ],
)  # fmt: skip
def test_provider_errors_are_classified_by_type(make: Any, transient: bool) -> None:
    assert is_transient_error(make()) is transient


def test_langchain_openai_wrappers_are_classified_like_the_sdk_errors() -> None:
    base = pytest.importorskip("langchain_openai.chat_models.base")
    wrapped = getattr(base, "OpenAIConnectionError", None)
    if wrapped is None:  # langchain-openai 1.0 raises the SDK's own classes
        pytest.skip("this langchain-openai raises openai.APIConnectionError itself")
    error = call_error(wrapped(message="Connection error.", request=REQUEST), "aggregator", "m")
    assert error.transient and error.unreachable and not error.rejected
    denied = base.OpenAIAuthenticationError(
        "bad key", response=httpx.Response(401, request=REQUEST), body=None
    )
    error = call_error(denied, "aggregator", "m")
    assert error.rejected and not error.transient and not error.unreachable


@pytest.mark.parametrize(
    ("exc", "rejected", "unreachable"),
    [
        (status_error(openai.AuthenticationError, 401), True, False),
        (status_error(openai.NotFoundError, 404), True, False),
        (openai.APIConnectionError(request=REQUEST), False, True),
        (openai.APITimeoutError(request=REQUEST), False, False),  # reached, but slow
        (socket.gaierror(-2, "Name or service not known"), False, True),  # DNS
        (ConnectionRefusedError(111, "refused"), False, True),
        (MyAuthenticationError("look-alike"), False, False),
        (ValueError("prompt too long"), False, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_pipelines_tell_unusable_models_and_connection_errors_by_type(
    exc: BaseException, rejected: bool, unreachable: bool
) -> None:
    error = call_error(exc, "proposer 1", "m")
    assert (error.rejected, error.unreachable) == (rejected, unreachable)
    watch = _Watch(lambda: None)
    watch(CallResult(ModelCall(ScriptedChatModel(), [], "proposer 1", "proposer"), error=error))
    assert (bool(watch.blocked), bool(watch.connection)) == (rejected, unreachable)


# ------------------------------------------------------------- judge: ConfigError

JUDGE_FACES = [
    (lambda: MoAJudge(judges=[]), "MoAJudge needs at least one judge model: judges=[...]"),
    (
        lambda: MoAJudge(judges=[ScriptedChatModel()], mode="listwise"),  # type: ignore[arg-type]
        "mode must be 'pairwise', 'pointwise' or 'likelihood', got 'listwise'",
    ),
    (
        lambda: MoAJudge(judges=[ScriptedChatModel()], criteria="strict"),
        "criteria must be a list of strings, 'dynamic' or None",
    ),
    (
        lambda: MoAJudge(judges=[ScriptedChatModel()], max_concurrency=0),
        "max_concurrency must be at least 1 or None, got 0",
    ),
    (
        lambda: MoAJudge(judges=[ScriptedChatModel()], max_concurrency=True),
        "max_concurrency must be at least 1 or None, got True",
    ),
    (
        lambda: build_judge_graph(MoAJudge(judges=[ScriptedChatModel()]), ScriptedChatModel(), n=1),
        "n must be at least 2 for pairwise judging, got 1",
    ),
    (
        lambda: build_judge_graph(
            MoAJudge(judges=[ScriptedChatModel()], mode="pointwise"), ScriptedChatModel(), n=0
        ),
        "n must be at least 1, got 0",
    ),
    (
        lambda: build_judge_graph(
            MoAJudge(judges=[ScriptedChatModel()]), ScriptedChatModel(), max_attempts=0
        ),
        "max_attempts must be at least 1, got 0",
    ),
    (
        lambda: MoAJudge(judges=[42]),  # type: ignore[list-item]
        "judge 1: expected a BaseChatModel or a model string like 'openai:gpt-4o-mini', got int",
    ),
]


@pytest.mark.parametrize(("build", "message"), JUDGE_FACES, ids=[m for _, m in JUDGE_FACES])
def test_judge_faces_raise_config_error(build: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message

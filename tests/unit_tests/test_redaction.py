"""Redaction by value first (every model's keys, named variables), patterns second."""

from __future__ import annotations

import logging
import secrets
import string
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from pydantic import SecretStr

from langchain_moa import ChatMoA
from langchain_moa.calls import CallError, ModelCall, invoke
from langchain_moa.cli import main
from langchain_moa.redaction import (
    RedactingFilter,
    install_log_redaction,
    looks_like_secret,
    redact,
    register_env,
    register_secrets,
    secrets_of,
)
from langchain_moa.testing.fakes import ScriptedChatModel


def shapeless() -> str:
    """A key no pattern knows: mixed-case letters and digits, no known prefix. It starts
    with an upper-case letter, a lower-case one and a digit, so any 20-character prefix
    has the mix the random-token net looks for (random characters alone lack a digit in
    4 % of 20-character draws: that made a test fail at random)."""
    alphabet = string.ascii_letters + string.digits
    return "Zk7" + "".join(secrets.choice(alphabet) for _ in range(27))


def netless() -> str:
    """A key no pattern catches, not even the random-token net (no upper case)."""
    alphabet = string.ascii_lowercase + string.digits
    return "zq" + "".join(secrets.choice(alphabet) for _ in range(26))


class ProviderWithOddKeyField(ScriptedChatModel):
    """A provider class whose key lives in a field named its own way."""

    acme_credential: SecretStr = SecretStr("")
    session_token: str = ""


def test_secrets_of_finds_secretstr_fields_of_any_name_and_bound_models() -> None:
    key, token = shapeless(), shapeless()
    model = ProviderWithOddKeyField(acme_credential=SecretStr(key), session_token=token)
    assert set(secrets_of(model.bind(temperature=0))) == {key, token}


def test_a_failing_models_key_is_removed_from_the_call_error() -> None:
    key = shapeless()
    model = ProviderWithOddKeyField(
        acme_credential=SecretStr(key), fail_always=True, error=RuntimeError(f"bad key {key}")
    )
    with pytest.raises(CallError) as info:
        invoke(ModelCall(model, [], "judge 1", "judge"))
    assert key not in str(info.value) and "bad key ***" in str(info.value)


def test_chat_moa_api_key_is_known_before_any_call() -> None:
    key = shapeless()
    ChatMoA(proposers=[ScriptedChatModel()], aggregator=ScriptedChatModel(), api_key=key)
    assert redact(f"echo {key}") == "echo ***"


def test_named_environment_variables_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    value = netless()
    monkeypatch.setenv("ACME_ENDPOINT_ACCESS", value)  # not named like a credential
    assert value in redact(f"x {value}")
    register_env("ACME_ENDPOINT_ACCESS")
    assert redact(f"x {value}") == "x ***"
    monkeypatch.setenv("HF_TOKEN", shapeless())
    import os

    assert os.environ["HF_TOKEN"] not in redact(os.environ["HF_TOKEN"])


@pytest.mark.parametrize(
    "text",
    [
        "sk-proj-abcDEF123456789",
        "sk-ant-api03-abcdef123456",
        "gsk_abcdef1234567890",
        "tgp_v1_abcdef123456",
        "AIzaSyA1234567890abcdef",
        "hf_abcdefghij123456",
        "0123456789abcdef0123456789abcdef01234567",
    ],
)
def test_patterns_catch_the_known_shapes(text: str) -> None:
    assert looks_like_secret(text)
    assert redact(f"key {text} end") == "key *** end"


def test_prose_about_keys_stays_readable() -> None:
    assert redact("Incorrect API key provided: see the docs") == (
        "Incorrect API key provided: see the docs"
    )


def test_log_records_and_their_tracebacks_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    key = shapeless()
    register_env("ACME_LOG_ACCESS")
    logger = logging.getLogger("acme.test")
    logger.addFilter(RedactingFilter())
    import os

    os.environ["ACME_LOG_ACCESS"] = key
    try:
        try:
            raise RuntimeError(f"upstream rejected {key}")
        except RuntimeError:
            with caplog.at_level(logging.ERROR, logger="acme.test"):
                logger.exception("call failed with %s", key)
    finally:
        del os.environ["ACME_LOG_ACCESS"]
    assert key not in caplog.text and "call failed with ***" in caplog.text
    assert "upstream rejected ***" in caplog.text


def test_install_log_redaction_covers_handlers() -> None:
    logger = logging.getLogger("acme.install")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    install_log_redaction(logger)
    install_log_redaction(logger)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    logger.removeHandler(handler)


def test_cli_debug_flag_is_accepted_after_the_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes", "--debug"]) == 0
    assert "local" in capsys.readouterr().out


# ------------------------------------------------------------ key sources


def test_base_url_userinfo_headers_and_query_are_secrets() -> None:
    from langchain_openai import ChatOpenAI

    password, header, bearer, query, user_token = (netless() for _ in range(5))
    model = ChatOpenAI(
        model="m",
        api_key="sk-scripted-test",
        base_url=f"http://moa-user:{password}@127.0.0.1:9/v1",
        default_headers={"X-Acme-Auth": header, "Authorization": f"Bearer {bearer}"},
        default_query={"key": query, "api-version": "2024-06-01"},
    )
    found = set(secrets_of(model))
    assert {password, header, bearer, query} <= found
    assert "2024-06-01" not in found and "moa-user" not in found  # settings, not secrets
    import base64

    assert base64.b64encode(f"moa-user:{password}".encode()).decode() in found  # Basic auth
    assert user_token in secrets_of(
        ChatOpenAI(model="m", api_key="x", base_url=f"https://{user_token}@h/v1")
    )


def test_a_url_password_is_masked_whatever_its_shape() -> None:
    assert redact("POST http://moa-user:hunter2@127.0.0.1:80/v1 failed") == (
        "POST http://moa-user:***@127.0.0.1:80/v1 failed"
    )


def test_a_random_looking_token_of_unknown_shape_is_masked_but_names_stay() -> None:
    token = shapeless()[:20]
    assert redact(f"model {token!r} not found") == "model '***' not found"
    assert looks_like_secret(token)
    prose = (
        "PermissionDeniedError: gpt-4o-mini-2024-07-18 refused chatcmpl-AbC123dEf456GhI789jKl0 "
        "(req_Ab12Cd34Ef56Gh78Ij90Kl)"
    )
    assert redact(prose) == prose


def test_environment_credentials_are_reread_when_the_environment_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = netless(), netless()
    monkeypatch.setenv("ACME_API_KEY", first)
    assert redact(first) == "***"
    monkeypatch.setenv("ACME_API_KEY", second)  # same name, new value: not a stale cache
    assert redact(second) == "***" and redact(first) == first


def test_answers_are_masked_by_value_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_moa.redaction import answer_secrets, mask_values

    monkeypatch.setenv("KEYBOARD_LAYOUT", "enabled-intl")  # named like a key, yet a setting
    key = netless()
    model = ProviderWithOddKeyField(acme_credential=SecretStr(key))
    from langchain_moa.redaction import register_models

    local = ProviderWithOddKeyField(acme_credential=SecretStr("ollama"))  # a placeholder key
    register_models([model, local])
    secrets = answer_secrets()
    hexdigest = "0123456789abcdef0123456789abcdef01234567"
    text = f"sha {hexdigest}, layout enabled-intl, run ollama, key {key}"
    assert mask_values(text, secrets) == (
        f"sha {hexdigest}, layout enabled-intl, run ollama, key ***"
    )
    assert redact("ollama") == "***"  # errors and logs still mask it


# ------------------------------------------------------------ the call layer


class EchoingModel(ScriptedChatModel):
    """A hostile provider: streams its own key back, cut into 3-character pieces."""

    acme_credential: SecretStr = SecretStr("")

    @staticmethod
    def _tokens(message: Any) -> list[str]:
        text = message.text
        return [text[i : i + 3] for i in range(0, len(text), 3)]


@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke", "astream"])
async def test_a_key_echoed_in_an_answer_is_masked_even_split_across_chunks(how: str) -> None:
    from langchain_moa.calls import ainvoke, astream, stream

    key = netless()
    model = EchoingModel(acme_credential=SecretStr(key), reply=f"my key is {key} ok")
    call = ModelCall(model, [], "aggregator", "aggregator")
    if how == "invoke":
        text = invoke(call).text
    elif how == "ainvoke":
        text = (await ainvoke(call)).text
    elif how == "stream":
        pieces = [c.text for c in stream(call)]
        assert all(key[:3] not in p for p in pieces)  # no piece shows part of the key
        text = "".join(pieces)
    else:
        pieces = [c.text async for c in astream(call)]
        assert all(key[:3] not in p for p in pieces)
        text = "".join(pieces)
    assert text == "my key is *** ok"


def test_held_back_text_that_was_no_key_is_released() -> None:
    from langchain_core.messages import AIMessageChunk

    from langchain_moa.shielding import StreamMask

    mask = StreamMask(["abcdef123"])
    shown = [mask.chunk(AIMessageChunk(content=p)).content for p in ("x ab", "cd", "e!", " y")]
    assert shown == ["x ", "", "abcde!", " y"]  # held only while it could be the key
    plain = AIMessageChunk(content="abc")
    assert StreamMask(()).chunk(plain) is plain  # no secrets: untouched, no cost
    mask = StreamMask(["abcdef123"])
    assert mask.chunk(AIMessageChunk(content="the end: abc", id="m1")).content == "the end: "
    rest = mask.flush()  # the stream ended: released, as part of the same message
    assert rest is not None and (rest.content, rest.id) == ("abc", "m1")


class Recorder(BaseCallbackHandler):
    """A plain handler: what every callback of a child run receives."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.seen.append(("error", error, kwargs.get("response")))

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.seen.append(("end", response))

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen.append(("token", token, kwargs.get("chunk")))


def test_handlers_and_context_tracers_get_redacted_errors_and_masked_answers() -> None:
    from langchain_core.tracers.context import collect_runs

    key = netless()
    failing = ProviderWithOddKeyField(
        acme_credential=SecretStr(key), fail_always=True, error=RuntimeError(f"bad key {key}")
    )
    echoing = EchoingModel(acme_credential=SecretStr(key), reply=f"key {key}")
    recorder = Recorder()
    with collect_runs() as collected:
        with pytest.raises(CallError):
            invoke(ModelCall(failing, [], "judge 1", "judge"), {"callbacks": [recorder]})
        assert invoke(ModelCall(echoing, [], "judge 2", "judge"), {"callbacks": [recorder]}).text
        from langchain_moa.calls import stream

        list(stream(ModelCall(echoing, [], "judge 3", "judge"), {"callbacks": [recorder]}))
    kind, error, _ = recorder.seen[0]
    assert kind == "error" and isinstance(error, CallError)
    assert str(error) == "judge 1 (scripted): RuntimeError: bad key ***"
    assert key not in repr(recorder.seen)
    tokens = "".join(t for kind, t, *_ in (s for s in recorder.seen if s[0] == "token"))
    assert tokens == "key ***"
    runs = collected.traced_runs
    assert len(runs) == 3  # one run per call: the context tracer is not added twice
    assert "bad key ***" in runs[0].error and key not in str([r.model_dump() for r in runs])


# ------------------------------------------------------------------ logging


def test_library_loggers_are_redacted_at_debug_for_any_handler() -> None:
    import io

    from langchain_moa.redaction import keep_library_log_redaction

    key = netless()
    register_secrets([key])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # what logging.basicConfig(level=DEBUG) adds
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    later = logging.getLogger("httpx2._late_child")  # a module imported after us
    keep_library_log_redaction()
    try:
        logging.getLogger("httpx").info("HTTP Request: POST http://u:%s@h/v1", "pw9z8y7x6")
        logging.getLogger("httpcore.http11").debug("headers %s", [(b"X-Api-Key", key)])
        later.debug("echo %s", key)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    text = stream.getvalue()
    assert "http://u:***@h/v1" in text and key not in text and text.count("***") == 3


class Unsubclassable(Recorder):
    """A handler class that refuses subclasses: shielded by delegation instead."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("final class")


def test_a_handler_that_cannot_be_subclassed_is_shielded_by_delegation() -> None:
    key = netless()
    failing = ProviderWithOddKeyField(
        acme_credential=SecretStr(key), fail_always=True, error=RuntimeError(f"bad key {key}")
    )
    handler = Unsubclassable()
    with pytest.raises(CallError):
        invoke(ModelCall(failing, [], "judge 1", "judge"), {"callbacks": [handler]})
    assert [kind for kind, *_ in handler.seen] == ["error"]
    assert isinstance(handler.seen[0][1], CallError) and key not in repr(handler.seen)

"""Redaction by value first (every model's keys, named variables), patterns second."""

from __future__ import annotations

import logging
import secrets
import string

import pytest
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
    secrets_of,
)
from langchain_moa.testing.fakes import ScriptedChatModel


def shapeless() -> str:
    """A key no pattern knows: mixed-case letters and digits, no known prefix."""
    alphabet = string.ascii_letters + string.digits
    return "Zk" + "".join(secrets.choice(alphabet) for _ in range(28))


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

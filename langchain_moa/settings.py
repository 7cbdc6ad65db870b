"""`MoASettings`: the Mixture-of-Agents settings and their validation, declared once.

Every face runs the same settings: `ChatMoA` inherits these fields (LangChain chat models
keep their settings as flat fields, which LangChain serialises and `configurable_fields`
reconfigures), `build_moa_graph(**settings)` builds one, a `Recipe` (config files) inherits
them and `MoAEngine` runs one. Adding a setting is one field here plus its use (the engine).

Mistakes are one-line `ConfigError`s worded in parameter names
(``layers must be at least 1, got 0``), the same on every face; the CLI, which validates
its own flags first, speaks in flags. Validation runs when a settings object is built,
never per call: the engine trusts a `MoASettings` it is given and only checks the settings
against its proposers (`check_proposers`, a few comparisons).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from langchain_moa._compat import plain_validation_init
from langchain_moa.errors import ConfigError
from langchain_moa.prompts import DEFAULT_AGGREGATOR_PROMPT
from langchain_moa.redaction import looks_like_secret, redact
from langchain_moa.references import Placement

EarlyStop = Literal["agreement"] | Callable[[list[str]], bool] | None
"""``"agreement"``, a function of a layer's successful answers (True: stop), or None."""


class MoASettings(BaseModel):
    """The settings of a Mixture-of-Agents run (everything but the models themselves).

    Example:
        ```python
        from langchain_moa import MoASettings

        settings = MoASettings(layers=3, min_proposers=2, proposer_timeout=30)
        ```

    Built from keyword arguments, it raises a one-line `ConfigError` naming the parameter
    for a bad value. Checks that need the proposers (``min_proposers`` larger than their
    number...) run where the models meet the settings: `check_proposers`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    layers: StrictInt = Field(default=2, ge=1)
    """Total layers including the final aggregation; 1 means the aggregator alone."""
    aggregator_prompt: StrictStr = DEFAULT_AGGREGATOR_PROMPT
    """Instruction placed before the numbered answers."""
    proposer_timeout: Annotated[StrictFloat, Field(gt=0)] | None = None
    """Seconds; a proposer not done by then is cancelled and dropped (None or inf: no limit)."""
    min_proposers: StrictInt = Field(default=1, ge=1)
    """A layer with fewer successful answers raises `MoAError`."""
    layer_quorum: StrictInt | None = None
    """Close a proposer layer once this many answered; None waits for all (the reference)."""
    straggler_grace: StrictFloat = Field(default=0.5, ge=0, allow_inf_nan=False)
    """With `layer_quorum`: the others get this many times the elapsed layer time more."""
    early_stop: EarlyStop = None
    """Skip the remaining proposer layers: ``"agreement"`` or a function of the answers."""
    reference_placement: Placement = "first_system"
    """Drafts in the first system message (the reference) or after the conversation."""

    @plain_validation_init  # model_validate (a Recipe's config file) keeps pydantic's errors
    def __init__(self, **values: Any) -> None:
        """Validate `values`; a mistake is one `ConfigError` line (see `describe_error`)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            error = describe_error(exc, type(self).__name__)
        else:
            return
        raise error  # outside the handler: pydantic's multi-line report is not chained

    @field_validator("proposer_timeout")
    @classmethod
    def _inf_is_no_limit(cls, value: float | None) -> float | None:
        return None if value is not None and math.isinf(value) else value

    @field_validator("early_stop", mode="before")
    @classmethod
    def _known_early_stop(cls, value: Any) -> Any:
        if value is None or value == "agreement" or callable(value):
            return value
        raise ConfigError(
            "early_stop must be None, 'agreement' or a function of the layer's answers, "
            f"got {shown(value)}"
        )

    @property
    def proposer_layers(self) -> int:
        """Number of proposer layers (the last layer is the aggregator)."""
        return self.layers - 1

    def check_proposers(self, n_proposers: int) -> None:
        """Raise a one-line `ConfigError` when these settings cannot run `n_proposers`."""
        layers, least, quorum = self.layers, self.min_proposers, self.layer_quorum
        if layers > 1 and n_proposers == 0:
            raise ConfigError(
                f"layers={layers} needs at least one proposer; pass proposers=[...] or use "
                "layers=1"
            )
        if layers > 1 and least > n_proposers:
            raise ConfigError(
                f"min_proposers={least} is more than the {n_proposers} proposers given; "
                "lower min_proposers or add proposers"
            )
        if quorum is not None and not least <= quorum <= n_proposers:
            raise ConfigError(
                f"layer_quorum must be an integer from min_proposers ({least}) to the number "
                f"of proposers ({n_proposers}), or None to wait for all; got {quorum}"
            )


# ------------------------------------------------------------------------ messages

_REASONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "greater_than_equal": lambda ctx: f"must be at least {ctx.get('ge'):g}",
    "greater_than": lambda ctx: f"must be greater than {ctx.get('gt'):g}",
    "less_than_equal": lambda ctx: f"must be at most {ctx.get('le'):g}",
    "less_than": lambda ctx: f"must be less than {ctx.get('lt'):g}",
    "finite_number": lambda ctx: "must be a finite number",
    "int_type": lambda ctx: "must be an integer",
    "float_type": lambda ctx: "must be a number",
    "string_type": lambda ctx: "must be a string",
    "bool_type": lambda ctx: "must be true or false",
    "literal_error": lambda ctx: f"must be {ctx.get('expected')}",
}


def describe_error(exc: ValidationError, owner: str) -> ConfigError:
    """The first of pydantic's errors as one redacted `ConfigError` line.

    A `ConfigError` raised by a validator keeps its own words; a setting of `MoASettings`
    reads ``{setting} {reason}, got {value}``; any other field of `owner` (a `ChatMoA`
    field such as ``max_tokens``) reads ``{owner}: {field}: {reason}``. A value is shown
    only when it cannot be a key (`shown`).
    """
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return ConfigError(redact(str(cause)))
    loc = error.get("loc") or ()
    name = str(loc[0]) if loc else ""
    kind = error.get("type", "")
    if name in MoASettings.model_fields and kind in _REASONS:
        reason = _REASONS[kind](error.get("ctx") or {})
        return ConfigError(redact(f"{name} {reason}, got {shown(error.get('input'))}"))
    if kind == "extra_forbidden":
        known = list(MoASettings.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        what = repr(name) if not could_be_secret(name) else "(name not repeated)"
        return ConfigError(
            redact(f"unknown MoA setting {what} ({hint}known: {', '.join(known)})")
        )
    where = ".".join(str(part) for part in loc)
    reason = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    text = f"{owner}: {where + ': ' if where else ''}{reason}"
    return ConfigError(redact(text.splitlines()[0]))


# Where a value could be a key: a run of 16+ characters mixing letter cases or digits.
_WORD_BREAK = re.compile(r"[\s\-/.:_@,;=+'\"()\[\]{}]+")


def could_be_secret(text: str) -> bool:
    """Whether a message must not repeat `text`: a known key shape, or a long random run.

    Model names, variable names and typos split into short words ("Llama-3.3-70B",
    "TOGETHER_API_KEY", "temprature"); keys are long runs of mixed characters.
    """
    if looks_like_secret(text):
        return True
    for word in _WORD_BREAK.split(text):
        classes = sum(
            any(test(c) for c in word) for test in (str.islower, str.isupper, str.isdigit)
        )
        if len(word) >= 16 and classes >= 2:
            return True
    return False


def shown(value: Any) -> str:
    """A value for an error message: numbers as they are, text only when it is no key."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 64:  # repr of 10**5000 fails; a 20-digit number says enough
            return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if len(value) <= 40 and value.isprintable() and not could_be_secret(value):
            return repr(value)
        return f"a string of {len(value)} characters (not repeated: it could be a key)"
    return type(value).__name__


__all__ = ["EarlyStop", "MoASettings", "could_be_secret", "describe_error", "shown"]

"""Tool calls through a JSON grammar (`constrained`), and ChatMoA's structured output.

The embedded server is exercised for real in tests/integration_tests/test_local_tools.py;
here the request it receives and the way its JSON is read back are checked exactly.
"""

from __future__ import annotations

import json

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from langchain_moa import ChatMoA
from langchain_moa.constrained import ConstrainedOutputError, ToolPlan, _plain_history
from langchain_moa.testing.fakes import ScriptedChatModel


class Place(BaseModel):
    """A place on a map."""

    city: str = Field(description="the city's name")
    country: str


class Route(BaseModel):
    """Two places."""

    start: Place
    end: Place


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '6 * 7'."""
    return expression


# A hand-written tool whose schema keeps its $refs (LangChain inlines a pydantic model's).
ROUTE = {
    "type": "function",
    "function": {
        "name": "Route",
        "description": "Two places.",
        "parameters": {
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/Place"}, "end": {"$ref": "#/$defs/Place"}},
            "required": ["start", "end"],
            "$defs": {"Place": Place.model_json_schema()},
        },
    },
}
TOOLS = [convert_to_openai_tool(calculator), ROUTE]


def test_no_tools_or_tool_choice_none_leave_the_request_alone() -> None:
    assert ToolPlan.of({}) is None
    assert ToolPlan.of({"tools": TOOLS, "tool_choice": "none"}) is None


@pytest.mark.parametrize(
    "choice",
    ["calculator", {"type": "function", "function": {"name": "calculator"}}],
)
def test_a_named_tool_is_answered_with_its_arguments_only(choice) -> None:
    plan = ToolPlan.of({"tools": TOOLS, "tool_choice": choice})
    assert plan is not None and plan.forced == "calculator" and plan.required
    assert plan.schema() == TOOLS[0]["function"]["parameters"]
    messages, options = plan.request(
        [SystemMessage("Be brief."), HumanMessage("17 * 23?")],
        {"tools": TOOLS, "tool_choice": choice, "temperature": 0.1},
    )
    assert "tools" not in options and "tool_choice" not in options
    assert options["temperature"] == 0.1
    assert options["extra_body"]["json_schema"] == plan.schema()
    assert messages[0].content.startswith("Be brief.\n\n")  # appended, not a second system
    assert "calculator" in messages[0].content and len(messages) == 2
    message = plan.read(AIMessage('{"expression": "17 * 23"}', usage_metadata=_usage()))
    (call,) = message.tool_calls
    assert call["name"] == "calculator" and call["args"] == {"expression": "17 * 23"}
    assert call["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.usage_metadata == _usage()


def test_required_with_several_tools_picks_one_and_hoists_defs() -> None:
    plan = ToolPlan.of({"tools": TOOLS, "tool_choice": "required"})
    assert plan is not None and plan.forced is None and plan.required
    schema = plan.schema()
    names = [o["properties"]["name"]["const"] for o in schema["anyOf"]]
    assert names == ["calculator", "Route"]  # no free-text option
    assert "Place" in schema["$defs"]  # Route's $ref targets live at the top
    assert '"$defs":' not in json.dumps(schema["anyOf"])  # only the $refs stay below
    message = plan.read(
        AIMessage(
            json.dumps(
                {
                    "name": "Route",
                    "arguments": {
                        "start": {"city": "Lyon", "country": "France"},
                        "end": {"city": "Turin", "country": "Italy"},
                    },
                }
            )
        )
    )
    assert Route.model_validate(message.tool_calls[0]["args"]).end.city == "Turin"


def test_any_with_one_tool_forces_it() -> None:
    plan = ToolPlan.of({"tools": TOOLS[:1], "tool_choice": "any"})
    assert plan is not None and plan.forced == "calculator"


def test_auto_admits_a_text_answer() -> None:
    plan = ToolPlan.of({"tools": TOOLS})
    assert plan is not None and not plan.required and plan.forced is None
    assert {"answer"} <= set(plan.schema()["anyOf"][-1]["properties"])
    message = plan.read(AIMessage('{"answer": "It is 391."}'))
    assert message.content == "It is 391." and not message.tool_calls


def test_an_unknown_forced_tool_is_a_clear_error() -> None:
    with pytest.raises(ConstrainedOutputError, match="'search', which is not among"):
        ToolPlan.of({"tools": TOOLS, "tool_choice": "search"})


def test_a_cut_off_call_names_max_tokens() -> None:
    plan = ToolPlan.of({"tools": TOOLS, "tool_choice": "calculator"})
    cut = AIMessage('{"expression": "17 *', response_metadata={"finish_reason": "length"})
    with pytest.raises(ConstrainedOutputError, match="raise max_tokens"):
        plan.read(cut)
    with pytest.raises(ConstrainedOutputError, match="not the JSON asked for"):
        plan.read(AIMessage("seventeen"))


def test_tool_turns_reach_the_server_as_text() -> None:
    history = [
        HumanMessage("17 * 23?"),
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"x": 1}, "id": "c1"}]),
        ToolMessage("391", tool_call_id="c1", name="calculator"),
    ]
    plain = _plain_history(history)
    # No assistant turn in a tool-call form for a small model to copy as its answer
    # (issue 21: SmolLM2 answered "[called tool calculator ...]"); the result is a note
    # that asks for the answer.
    # ... in the user's own turn, so roles alternate (templates like Mistral's enforce it)
    assert [m.type for m in plain] == ["human"]
    assert plain[-1].content == (
        "17 * 23?\n\n"
        'The calculator tool was called with {"x": 1} and returned: 391\n'
        "Answer the question using this result."
    )
    assert history[0].content == "17 * 23?"  # the caller's message is not mutated
    untouched = [HumanMessage("hi")]
    assert _plain_history(untouched) is untouched


def test_every_tool_turn_is_kept_as_text_in_its_note() -> None:
    """Several calls, an error, words beside a call, a call still waiting: nothing is lost."""
    history = [
        HumanMessage("Weather in Oslo and 2 + 2?"),
        AIMessage(
            "Let me check.",
            tool_calls=[
                {"name": "weather", "args": {"city": "Oslo"}, "id": "w"},
                {"name": "calculator", "args": {"expression": "2 + 2"}, "id": "c"},
            ],
        ),
        ToolMessage("4", tool_call_id="c", name="calculator"),
        ToolMessage("timeout", tool_call_id="w", name="weather", status="error"),
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "4"}, "id": "d"}]),
    ]
    plain = _plain_history(history)
    assert [(m.type, m.content) for m in plain] == [
        ("human", "Weather in Oslo and 2 + 2?"),
        ("ai", "Let me check."),
        (
            "human",
            'The calculator tool was called with {"expression": "2 + 2"} and returned: 4\n'
            'The weather tool was called with {"city": "Oslo"} and failed: timeout\n'
            "Answer the question using these results.\n\n"
            'The calculator tool was called with {"expression": "4"} and has no result yet.',
        ),
    ]
    types = [m.type for m in plain]
    assert all(types[i] != types[i + 1] for i in range(len(types) - 1))  # roles alternate


def _usage() -> dict:
    return {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}


# ------------------------------------------------------- ChatMoA structured output


def _moa(aggregator: ScriptedChatModel) -> ChatMoA:
    return ChatMoA(proposers=[ScriptedChatModel(reply="Lyon, France")], aggregator=aggregator)


def test_structured_output_is_the_schema_object() -> None:
    aggregator = ScriptedChatModel(
        reply="",
        tool_calls=[{"name": "Place", "args": {"city": "Lyon", "country": "France"}, "id": "c"}],
    )
    assert _moa(aggregator).with_structured_output(Place).invoke("A city?") == Place(
        city="Lyon", country="France"
    )
    assert aggregator.call_kwargs[-1]["tool_choice"] == "any"


def test_an_aggregator_answering_in_text_is_an_error_not_none() -> None:
    aggregator = ScriptedChatModel(model_name="texty", reply="Lyon is in France.")
    structured = _moa(aggregator).with_structured_output(Place)
    with pytest.raises(OutputParserException, match=r"aggregator \(texty\) answered in text"):
        structured.invoke("A city?")
    raw = _moa(aggregator).with_structured_output(Place, include_raw=True).invoke("A city?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert raw["raw"].content == "Lyon is in France."


def test_json_schema_method_sends_response_format_to_the_aggregator() -> None:
    aggregator = ScriptedChatModel(reply='{"city": "Lyon", "country": "France"}')
    structured = _moa(aggregator).with_structured_output(Place, method="json_schema")
    assert structured.invoke("A city?") == Place(city="Lyon", country="France")
    sent = aggregator.call_kwargs[-1]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Place"
    with pytest.raises(OutputParserException):
        _moa(ScriptedChatModel(reply="no json")).with_structured_output(
            Place, method="json_mode"
        ).invoke("A city?")

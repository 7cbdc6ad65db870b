"""A tool-using agent whose reasoning step is the MoA subgraph.

    START -> agent (MoA, calculator bound to the aggregator) -> tools -> agent -> ... -> END

The proposers draft in text; the aggregator sees their drafts and may call the calculator.
A `ToolNode` runs the calls and the agent reasons again with the results in the history
(proposers see tool calls and results rewritten as text). The loop is capped: after
`max_steps` tool rounds the final answer is asked for with no tools bound, so the agent
always ends with a text answer, even with a small model that keeps calling tools.

Run it on the embedded local model (no API key):

    python examples/agent_with_moa.py
    python examples/agent_with_moa.py --recipe together-moa-lite --tool-choice auto \
        --max-steps 3 "What is 12.5% of 3,640?"
    python examples/agent_with_moa.py --seed 1 --seed 2   # one run per seed, one process

On the embedded model the calls are real: its llama.cpp server constrains the answer to a
valid calculator call (`langchain_moa.constrained`). The defaults force one call
(``tool_choice="required"``), then ask for the answer: SmolLM2-135M rarely chooses a tool
on its own, and it may still misread the result or write a wrong expression. A 135M
model shows the wiring, not the wisdom; a hosted recipe with ``--tool-choice auto``
lets the model decide.
"""

from __future__ import annotations

import argparse
import ast
import operator
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode

from langchain_moa import build_moa_graph

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    """Arithmetic only: numbers and + - * / // % ** (no names, calls or attributes)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:40]}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '6 * 7' or '(2 + 3) ** 2 / 4'."""
    try:
        value = _evaluate(ast.parse(expression.replace(",", ""), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _tool_rounds(messages: list[BaseMessage]) -> int:
    """Tool-calling answers since the user's last message."""
    rounds = 0
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            break
        if isinstance(message, AIMessage) and message.tool_calls:
            rounds += 1
    return rounds


def build_agent(
    proposers: list[Any],
    aggregator: Any,
    *,
    max_steps: int = 3,
    tool_choice: Any = None,
    **moa_kwargs: Any,
) -> Any:
    """The agent graph: MoA with the calculator, a ToolNode, and a capped loop.

    `tool_choice` is the aggregator's ("required" forces a call each round; None lets it
    choose). `moa_kwargs` go to `build_moa_graph` (layers, aggregator_prompt, ...).
    """
    tools = [calculator]
    reasoning = build_moa_graph(
        proposers, aggregator, tools=tools, tool_choice=tool_choice, name="moa", **moa_kwargs
    )
    # Same models and configuration, no tools: used once the tool budget is spent.
    final_answer = build_moa_graph(proposers, aggregator, name="moa_final", **moa_kwargs)

    def after_agent(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    def after_tools(state: MessagesState) -> str:
        return "final_answer" if _tool_rounds(state["messages"]) >= max_steps else "agent"

    builder = StateGraph(MessagesState)
    builder.add_node("agent", reasoning)
    builder.add_node("tools", ToolNode(tools))
    builder.add_node("final_answer", final_answer)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", after_agent, ["tools", END])
    builder.add_conditional_edges("tools", after_tools, ["agent", "final_answer"])
    builder.add_edge("final_answer", END)
    return builder.compile(name="agent_with_moa")


def _print_run(messages: list[BaseMessage]) -> None:
    for message in messages:
        if isinstance(message, AIMessage) and message.tool_calls:
            calls = ", ".join(f"{c['name']}({c['args']})" for c in message.tool_calls)
            print(f"[agent] calls {calls}")
        elif message.type == "tool":
            print(f"[tool] {message.content}")
        else:
            print(f"[{message.type}] {message.text}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is 17 * 23? Use the calculator.")
    parser.add_argument("--recipe", default="local", help="recipe name or config file")
    parser.add_argument(
        "--max-steps", type=int, default=1, help="tool rounds before answering (default: 1)"
    )
    parser.add_argument(
        "--tool-choice",
        choices=["required", "auto"],
        default="required",
        help="required: call the calculator each round; auto: the model decides "
        "(default: required)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        metavar="S",
        help="sampling seed (proposer i gets S + i - 1, the aggregator S); repeat it to run "
        "the question once per seed in one process (default: the recipe's seeds)",
    )
    args = parser.parse_args(argv)

    from langchain_moa.cli.options import moa_kwargs_for

    for seed in args.seed or [None]:
        _, moa_kwargs = moa_kwargs_for(args.recipe, argparse.Namespace(seed=seed))
        agent = build_agent(
            **moa_kwargs,
            max_steps=args.max_steps,
            tool_choice=None if args.tool_choice == "auto" else args.tool_choice,
        )
        if seed is not None:
            print(f"--- seed {seed}")
        # Each tool round is 2 super-steps of the parent graph; the cap above ends the loop
        # well before this limit, which is only a safety net.
        result = agent.invoke(
            {"messages": [HumanMessage(args.question)]},
            {"recursion_limit": 4 * args.max_steps + 10},
        )
        _print_run(result["messages"])


if __name__ == "__main__":
    main()

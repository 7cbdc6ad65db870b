"""Mixture-of-Agents as a LangGraph subgraph.

`build_moa_graph` compiles a `StateGraph` whose nodes run the MoA algorithm through the
same `MoAEngine` as `ChatMoA`: the engine decides what every request contains, calls the
proposers, checks the quorum and builds the final message, so the graph sends exactly the
requests `ChatMoA` sends for the same configuration. The graph adds what a graph is good
at: one visible node per proposer call, per-proposer retry policies, conditional routing
between layers, early stopping, checkpointed resumption and inspectable state.

    START -> prepare -(Send x n)-> proposer -> collect -(Send x n)-> proposer ...
    collect -> aggregator -> END    (last proposer layer done, or early stop)
    collect -> quorum_failed        (raises MoAError)
    prepare -> aggregator           (layers=1)

- ``prepare`` checks the conversation (``messages`` at entry) and resets the ``moa_*`` keys,
  so a thread that is invoked again (multi-turn with a checkpointer) starts a fresh MoA run.
- ``proposer`` runs once per proposer of a layer (``Send``); drafts go to ``moa_proposals``,
  never to ``messages``, and proposer runs carry the engine's ``nostream`` tag, so drafts
  never show up in ``stream_mode="messages"``.
- ``collect`` is the fan-in: it appends the layer to ``moa_layers``, totals usage and
  records a quorum failure in ``moa_error``. The routing after it sends the next layer,
  goes straight to the aggregator (last proposer layer, or early stop), or goes to
  ``quorum_failed``, which raises the engine's `MoAError` naming every failed proposer.
  The failure is raised by a node of its own so that, with a checkpointer, the failed
  layer is still recorded in the state you inspect afterwards.
- ``aggregator`` is the visible final step (its tokens stream): it writes exactly one
  `AIMessage`, built by `MoAEngine.final_message`, so it carries the same
  ``response_metadata["moa"]`` and summed ``usage_metadata`` as `ChatMoA`'s answer.

Retries and dropped proposers (design choice): each proposer node has LangGraph
`RetryPolicy` objects attached (``add_node(..., retry_policy=...)``), so LangGraph performs
the retries with its own backoff and reports each attempt as a run. The node calls the
engine's `proposal_steps`, which raises the call layer's `CallError` (one redacted line; a
custom ``retry_on`` sees that error and can read its ``transient``, ``status_code`` and
``error_type``), and when the call fails it decides with the *same* policies what
happens: if the matching policy would retry and the current attempt
(``runtime.execution_info.node_attempt``) is below its ``max_attempts``, it re-raises and
LangGraph retries; otherwise (non-retryable error, or last attempt) it returns a failed
`Proposal` built by the engine, so one bad proposer is dropped and recorded instead of
failing the graph. A proposer that exceeds ``proposer_timeout`` is dropped at once, like in
`ChatMoA`: the timeout is a latency budget for the layer, not a transient error. The
default policy (`DEFAULT_RETRY_POLICY`) retries connection errors, provider timeouts,
rate limits and 5xx, and never authentication, permission, not-found, bad-request,
`ValueError` or `TypeError` (see `is_transient_error`). The aggregator node gets the same
policy but never swallows errors: after its retries the graph fails (and, with a
checkpointer, resumes at the aggregator without re-running the proposer layers).

Sync and async: every node that calls a model has a sync and an async function
(`RunnableCallable(func, afunc)`, as LangGraph's prebuilt agent does), both driving the
same steps (`langchain_moa.steps`), so the two cannot differ. On ``invoke`` the proposer
tasks run concurrently in LangGraph's thread pool; on ``ainvoke`` they are concurrent
tasks that ``await`` the async call layer. The other nodes call no model and run inline.
"""

from __future__ import annotations

import operator
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AnyMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.runnables import RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Overwrite, RetryPolicy, Send

from langchain_moa._compat import RunnableCallable, node_attempt
from langchain_moa.calls import LayerClose
from langchain_moa.engine import (
    MoAEngine,
    Proposal,
    agreement,
    normalize_answer,
)
from langchain_moa.errors import CallError, ConfigError, MoAError, is_transient_error
from langchain_moa.models import resolve_model
from langchain_moa.settings import MoASettings
from langchain_moa.steps import Steps, adrive, drive

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "MoAInput",
    "MoAState",
    "ProposerTask",
    "agreement",
    "build_moa_graph",
    "is_transient_error",
    "merge_layer_proposals",
    "normalize_answer",
]


# --------------------------------------------------------------------------- state


def merge_layer_proposals(
    current: list[Proposal] | None, update: list[Proposal] | None
) -> list[Proposal]:
    """Fan-in reducer for ``moa_proposals``: the current layer, in proposer order.

    Proposer tasks finish in any order; sorting by proposer index here means the state
    (and everything built from it) never depends on completion order. Proposals of an
    older layer are dropped when the first proposal of a newer layer arrives, which is
    the reset between layers; a later proposal for the same (layer, proposer) replaces
    the earlier one.
    """
    merged: dict[tuple[int, int], Proposal] = {}
    for proposal in [*(current or []), *(update or [])]:
        merged[(proposal.layer, proposal.proposer)] = proposal
    if not merged:
        return []
    latest = max(layer for layer, _ in merged)
    return [merged[key] for key in sorted(merged) if key[0] == latest]


class MoAInput(TypedDict):
    """What the MoA graph reads: the conversation to answer."""

    messages: Annotated[list[AnyMessage], add_messages]


class MoAState(TypedDict):
    """State of the MoA graph.

    ``messages`` is the conversation at entry; the graph appends exactly one message to it,
    the final answer. The ``moa_*`` keys describe the run in progress (reset on entry).
    """

    messages: Annotated[list[AnyMessage], add_messages]
    moa_layer: int
    """The proposer layer most recently completed (0 before the first)."""
    moa_proposals: Annotated[list[Proposal], merge_layer_proposals]
    """The current layer's proposals, in proposer order (failed ones included)."""
    moa_layers: Annotated[list[list[Proposal]], operator.add]
    """Every completed proposer layer, oldest first."""
    moa_usage: UsageMetadata | None
    """Tokens used so far: proposers, then (after the aggregator) the grand total."""
    moa_error: str | None
    """Why the run stopped (too few proposers answered), else None."""


class ProposerTask(TypedDict, total=False):
    """The payload of one ``Send("proposer", ...)``: one proposer, one layer."""

    layer: int
    index: int
    messages: list[AnyMessage]
    close_id: str | None
    """The layer's early-close rule (`layer_quorum`), when there is one."""


# ---------------------------------------------------------------------- retries

DEFAULT_RETRY_POLICY = RetryPolicy(max_attempts=3, retry_on=is_transient_error)
"""Three attempts with LangGraph's default backoff, transient errors only."""


def _policies(retry_policy: RetryPolicy | Sequence[RetryPolicy] | None) -> tuple[RetryPolicy, ...]:
    if retry_policy is None:
        return (DEFAULT_RETRY_POLICY,)
    if isinstance(retry_policy, RetryPolicy):
        return (retry_policy,)
    policies = tuple(retry_policy)
    if not all(isinstance(p, RetryPolicy) for p in policies):
        raise ConfigError("retry_policy must be a RetryPolicy, a sequence of them, or None")
    return policies


def _matches(policy: RetryPolicy, exc: Exception) -> bool:
    """LangGraph's rule for whether `policy` applies to `exc` (first match wins)."""
    retry_on = policy.retry_on
    if isinstance(retry_on, Sequence):
        return isinstance(exc, tuple(retry_on))
    if isinstance(retry_on, type) and issubclass(retry_on, Exception):
        return isinstance(exc, retry_on)
    if callable(retry_on):
        return bool(retry_on(exc))
    raise TypeError("retry_on must be an exception class, a sequence of them or a callable")


# ------------------------------------------------------------------------ nodes


class _MoANodes:
    """The node and routing functions, bound to one engine and graph configuration."""

    def __init__(
        self,
        engine: MoAEngine,
        policies: tuple[RetryPolicy, ...],
        aggregator_kwargs: dict[str, Any],
    ) -> None:
        self.engine = engine
        # Layers that may close early, by id: a Send carries the id (its payload must stay
        # serializable for checkpointers); the oldest are forgotten past a bound. A run
        # resumed in another process finds no entry and waits for every proposer.
        self.open_layers: OrderedDict[str, LayerClose] = OrderedDict()
        self.policies = policies
        self.aggregator_kwargs = aggregator_kwargs

    # ------------------------------------------------------------------ prepare
    def prepare(self, state: MoAState) -> dict[str, Any]:
        self.engine.check_conversation(state.get("messages") or [])
        return {
            "moa_layer": 0,
            "moa_proposals": Overwrite([]),
            "moa_layers": Overwrite([]),
            "moa_usage": None,
            "moa_error": None,
        }

    # ------------------------------------------------------------------ routing
    def route(self, state: MoAState) -> str | list[Send]:
        """Next proposer layer (one Send per proposer), the aggregator, or failure."""
        if state.get("moa_error"):
            return "quorum_failed"
        layers = state.get("moa_layers") or []
        if len(layers) >= self.engine.proposer_layers:
            return "aggregator"
        previous = layers[-1] if layers else None
        if previous is not None and self.engine.stop_early(previous):
            return "aggregator"
        messages = self.engine.proposer_input(state["messages"], previous)
        layer = len(layers) + 1
        close_id = self._open_layer()
        return [
            Send(
                "proposer",
                ProposerTask(layer=layer, index=i, messages=messages, close_id=close_id),
            )
            for i in range(len(self.engine.proposers))
        ]

    def _open_layer(self) -> str | None:
        close = self.engine.layer_close()
        if close is None:
            return None
        close_id = uuid.uuid4().hex
        self.open_layers[close_id] = close
        while len(self.open_layers) > 1024:
            self.open_layers.popitem(last=False)
        return close_id

    def _close_of(self, task: ProposerTask) -> LayerClose | None:
        return self.open_layers.get(task.get("close_id") or "")

    # ---------------------------------------------------------------- proposers
    def _failed(
        self, error: CallError, task: ProposerTask, started: float, runtime: Any
    ) -> Proposal | None:
        """The failed proposal to record, or None when LangGraph should retry."""
        if not error.timed_out:  # the proposer's time budget is final: no retry
            policy = next((p for p in self.policies if _matches(p, error)), None)
            if policy is not None and node_attempt(runtime) < policy.max_attempts:
                return None
        return self.engine.failed_proposal(
            task["layer"], task["index"], task["messages"], error, time.perf_counter() - started
        )

    def _proposer_steps(self, task: ProposerTask, runtime: Any) -> Steps[dict]:
        started = time.perf_counter()
        try:
            proposal = yield from self.engine.proposal_steps(
                task["layer"], task["index"], task["messages"], self._close_of(task)
            )
        except CallError as error:
            failed = self._failed(error, task, started, runtime)
            if failed is None:
                raise
            proposal = failed
        return {"moa_proposals": [proposal]}

    def proposer(self, task: ProposerTask, config: RunnableConfig, runtime: Any) -> dict:
        return drive(self._proposer_steps(task, runtime), config)

    async def aproposer(self, task: ProposerTask, config: RunnableConfig, runtime: Any) -> dict:
        return await adrive(self._proposer_steps(task, runtime), config)

    # ------------------------------------------------------------------ fan-in
    def collect(self, state: MoAState) -> dict[str, Any]:
        proposals = list(state.get("moa_proposals") or [])
        layers = [*(state.get("moa_layers") or []), proposals]
        update: dict[str, Any] = {
            "moa_layer": proposals[0].layer if proposals else len(layers),
            "moa_layers": [proposals],
            "moa_usage": self.engine.proposer_usage(layers),
        }
        try:
            self.engine.check_quorum(proposals)
        except MoAError as exc:  # recorded here, raised by the quorum_failed node
            update["moa_error"] = str(exc)
        return update

    def quorum_failed(self, state: MoAState) -> dict[str, Any]:
        # Raises the engine's MoAError (message and `failures` name every failed proposer).
        self.engine.check_quorum(list(state.get("moa_proposals") or []))
        raise RuntimeError(state.get("moa_error") or "MoA quorum failed")  # pragma: no cover

    # --------------------------------------------------------------- aggregator
    def _aggregator_steps(self, state: MoAState) -> Steps[dict[str, Any]]:
        layers = state.get("moa_layers") or []
        call = self.engine.aggregator_call(state["messages"], layers, self.aggregator_kwargs)
        started = time.perf_counter()
        aggregate = yield call
        final = self.engine.final_message(layers, aggregate, time.perf_counter() - started)
        # Same id as the streamed aggregator chunks: LangGraph's message stream then
        # recognises the node output as the message it already streamed.
        final.id = aggregate.id
        return {"messages": [final], "moa_usage": final.usage_metadata}

    def aggregator(self, state: MoAState, config: RunnableConfig) -> dict[str, Any]:
        return drive(self._aggregator_steps(state), config)

    async def aaggregator(self, state: MoAState, config: RunnableConfig) -> dict[str, Any]:
        return await adrive(self._aggregator_steps(state), config)


def _node(func: Callable[..., dict[str, Any]], afunc: Callable[..., Any] | None = None) -> Any:
    """A graph node: `func` on invoke, `afunc` on ainvoke. Without `afunc` (a node that
    calls no model) ainvoke runs `func` inline, on the event loop, not on a thread."""
    if afunc is None:

        async def afunc(state: MoAState) -> dict[str, Any]:
            return func(state)

    return RunnableCallable(func, afunc, name=func.__name__)


# -------------------------------------------------------------------- building


def _aggregator_kwargs(tools: Sequence[Any] | None, tool_choice: Any) -> dict[str, Any]:
    """The same aggregator options `ChatMoA.bind_tools` produces (OpenAI tool format)."""
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
    elif tool_choice is not None:
        raise ConfigError("tool_choice needs tools=[...]")
    return kwargs


def build_moa_graph(
    proposers: Sequence[BaseChatModel | str] | BaseChatModel | str | None = None,
    aggregator: BaseChatModel | str | None = None,
    *,
    settings: MoASettings | None = None,
    retry_policy: RetryPolicy | Sequence[RetryPolicy] | None = None,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    checkpointer: BaseCheckpointSaver | bool | None = None,
    interrupt_before: Sequence[str] | None = None,
    interrupt_after: Sequence[str] | None = None,
    name: str = "moa",
    **moa_settings: Any,
) -> CompiledStateGraph:
    """Compile the MoA graph; add it as a node of a `MessagesState` graph or run it alone.

    Args:
        proposers: proposer models (instances or `init_chat_model` strings).
        aggregator: the model writing the final answer (instance or string).
        settings: the MoA settings as a `MoASettings`; or pass them as keyword arguments
            (``**moa_settings``), not both.
        retry_policy: policies for proposer and aggregator nodes; None means
            `DEFAULT_RETRY_POLICY` (transient errors, 3 attempts). Pass
            ``RetryPolicy(max_attempts=1)`` to disable retries.
        tools, tool_choice: tools bound to the aggregator (proposers answer in text), so
            the final message can carry tool calls; pair with a `ToolNode` in the parent.
        checkpointer: as for `StateGraph.compile`; None inherits the parent's.
        interrupt_before, interrupt_after: node names, as for `StateGraph.compile`.
        name: the compiled graph's name.
        **moa_settings: any `MoASettings` field, meaning what it means on `ChatMoA`:
            ``layers`` (total layers, 1 = the aggregator alone), ``aggregator_prompt``,
            ``proposer_timeout`` (a slower proposer is dropped), ``min_proposers`` (a
            layer with fewer answers fails with `MoAError`), ``early_stop``
            (``"agreement"`` or a function of a layer's successful answers returning True
            to skip the remaining proposer layers), ``layer_quorum`` and
            ``straggler_grace`` (close a layer early: once ``layer_quorum`` proposers
            answered, the others get ``straggler_grace`` times the elapsed layer time
            more), ``reference_placement`` (``"first_system"``, the reference structure,
            or ``"after_conversation"``, which keeps a provider's prompt cache valid).

    A bad setting is a one-line `ConfigError` raised here, before any model is called,
    with the message `ChatMoA` gives for it. The compiled graph's ``moa_engine``
    attribute is the engine it runs (with the visible aggregator tags: in the graph the
    aggregator node is the final, streamed step).
    """
    if settings is None:
        settings = MoASettings(**moa_settings)
    elif moa_settings:
        raise ConfigError(
            f"pass the MoA settings either as settings=MoASettings(...) or as keyword "
            f"arguments, not both (got settings= and {', '.join(sorted(moa_settings))})"
        )
    if aggregator is None:
        raise ConfigError("aggregator is required: pass a chat model or a model string")
    if proposers is None:
        proposers = []
    elif isinstance(proposers, (str, BaseChatModel)):
        proposers = [proposers]
    engine = MoAEngine(
        proposers=tuple(
            resolve_model(spec, role=f"proposer {i + 1}") for i, spec in enumerate(proposers)
        ),
        aggregator=resolve_model(aggregator, role="aggregator"),
        settings=settings,
        aggregator_hidden=False,
    )
    nodes = _MoANodes(
        engine,
        _policies(retry_policy),
        _aggregator_kwargs(tools, tool_choice),
    )
    policies = list(nodes.policies)

    builder = StateGraph(MoAState, input_schema=MoAInput)
    builder.add_node("prepare", _node(nodes.prepare))
    builder.add_node("proposer", _node(nodes.proposer, nodes.aproposer), retry_policy=policies)
    builder.add_node("collect", _node(nodes.collect))
    builder.add_node(
        "aggregator", _node(nodes.aggregator, nodes.aaggregator), retry_policy=policies
    )
    builder.add_node("quorum_failed", _node(nodes.quorum_failed))
    builder.add_edge(START, "prepare")
    builder.add_conditional_edges("prepare", nodes.route, ["proposer", "aggregator"])
    builder.add_edge("proposer", "collect")
    builder.add_conditional_edges(
        "collect", nodes.route, ["proposer", "aggregator", "quorum_failed"]
    )
    builder.add_edge("aggregator", END)
    builder.add_edge("quorum_failed", END)
    graph = builder.compile(
        checkpointer=checkpointer,
        interrupt_before=list(interrupt_before) if interrupt_before else None,
        interrupt_after=list(interrupt_after) if interrupt_after else None,
        name=name,
    )
    graph.moa_engine = engine  # type: ignore[attr-defined]
    return graph

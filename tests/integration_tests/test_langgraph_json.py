"""`langgraph.json` is deployable: valid shape, and every graph it names loads and runs.

Graph modules are imported from their file paths the way LangGraph Server does it
(`spec_from_file_location`, then the variable read from the module namespace). The `moa`
graph is built from a real recipe config file (``MOA_RECIPE``) whose models live on the
scripted loopback OpenAI-compatible server, so nothing leaves the machine.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import HumanMessage
from langgraph.pregel import Pregel

from langchain_moa.testing import API_KEY, ModelScript, ScriptedOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "langgraph.json"


def load_config() -> dict:
    return json.loads(CONFIG.read_text(encoding="utf-8"))


def graph_entries() -> dict[str, tuple[Path, str]]:
    entries = {}
    for graph_id, spec in load_config()["graphs"].items():
        path, _, variable = spec.partition(":")
        entries[graph_id] = (ROOT / path, variable)
    return entries


def import_from_path(path: Path) -> ModuleType:
    """Import a file the way LangGraph Server does (a fresh module per load)."""
    name = "lg_" + "_".join(path.relative_to(ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_config_has_the_shape_langgraph_cli_expects() -> None:
    config = load_config()
    assert set(config) <= {"python_version", "dependencies", "graphs", "env", "dockerfile_lines"}
    assert config["dependencies"] == ["."]
    assert set(config["graphs"]) == {"moa", "judge"}
    for graph_id, (path, variable) in graph_entries().items():
        assert variable == "graph", graph_id
        assert path.suffix == ".py" and path.is_relative_to(ROOT / "graphs"), graph_id
    env = config.get("env")
    if isinstance(env, str):  # a .env path must exist, or `langgraph dev` fails
        assert (ROOT / env).is_file()


@pytest.fixture
def scripted_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ScriptedOpenAIServer]:
    scripts = {
        "p1": ModelScript(reply="first draft"),
        "p2": ModelScript(reply="second draft"),
        "agg": ModelScript(reply="deployed answer"),
    }
    with ScriptedOpenAIServer(scripts=scripts) as server:
        recipe = tmp_path / "scripted.toml"
        entries = "\n".join(
            f'[[proposers]]\nmodel = "{name}"\nbase_url = "{server.base_url}"\n'
            f'api_key_env = "SCRIPTED_API_KEY"\n'
            for name in ("p1", "p2")
        )
        recipe.write_text(
            f'layers = 2\naggregator_prompt = "Merge:"\n\n{entries}\n'
            f'[aggregator]\nmodel = "agg"\nbase_url = "{server.base_url}"\n'
            f'api_key_env = "SCRIPTED_API_KEY"\n',
            encoding="utf-8",
        )
        monkeypatch.setenv("SCRIPTED_API_KEY", API_KEY)
        monkeypatch.setenv("MOA_RECIPE", str(recipe))
        yield server


@pytest.mark.http
def test_moa_entry_builds_the_recipe_graph_and_answers(
    scripted_recipe: ScriptedOpenAIServer,
) -> None:
    path, variable = graph_entries()["moa"]
    module = import_from_path(path)
    graph = module.__dict__[variable]  # LangGraph Server reads the namespace, not getattr
    assert isinstance(graph, Pregel)
    assert graph.checkpointer is None  # the server brings its own persistence
    assert graph.name == "moa"

    out = graph.invoke({"messages": [HumanMessage("Hello?")]})
    assert out["messages"][-1].content == "deployed answer"
    (agg,) = scripted_recipe.requests_for("agg")
    assert agg.messages[0] == {
        "role": "system",
        "content": "Merge:\n1. first draft\n2. second draft",
    }
    assert agg.messages[1] == {"role": "user", "content": "Hello?"}


def test_moa_entry_uses_the_local_recipe_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MOA_RECIPE the module asks for the ``local`` recipe (loader patched: the
    real local recipe starts the embedded model, which the local-model tests cover)."""
    import langchain_moa.recipes as recipes
    from langchain_moa.testing.fakes import ScriptedChatModel

    asked: list[str] = []

    class FakeRecipe:
        def chat_moa_kwargs(self) -> dict:
            return {
                "proposers": [ScriptedChatModel(model_name="p", reply="draft")],
                "aggregator": ScriptedChatModel(model_name="agg", reply="local answer"),
                "layers": 2,
                "min_proposers": 1,
                "proposer_timeout": None,
            }

    def fake_load_recipe(name: str) -> FakeRecipe:
        asked.append(name)
        return FakeRecipe()

    monkeypatch.delenv("MOA_RECIPE", raising=False)
    monkeypatch.setattr(recipes, "load_recipe", fake_load_recipe)
    module = import_from_path(graph_entries()["moa"][0])
    assert asked == ["local"]
    out = module.graph.invoke({"messages": [HumanMessage("q")]})
    assert out["messages"][-1].content == "local answer"
    module.make_graph("together-moa-lite")
    assert asked == ["local", "together-moa-lite"]


@pytest.mark.http
def test_judge_entry_loads_and_picks_the_better_candidate(
    scripted_recipe: ScriptedOpenAIServer,
) -> None:
    def prefers_the_long_answer(body: dict) -> str:
        text = body["messages"][-1]["content"]
        a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        b = text.split("[Answer B]\n")[1]
        return "[[A]]" if len(a) > len(b) else "[[B]]"

    samples = iter(["short", "a much longer candidate answer", "mid answer"])
    scripted_recipe.set_script("p1", ModelScript(reply=prefers_the_long_answer))
    scripted_recipe.set_script("p2", ModelScript(reply=prefers_the_long_answer))
    scripted_recipe.set_script(
        "agg",
        ModelScript(
            reply=lambda body: (
                prefers_the_long_answer(body)
                if "[Answer A]" in body["messages"][-1]["content"]
                else next(samples)
            )
        ),
    )
    path, variable = graph_entries()["judge"]
    module = import_from_path(path)
    graph = module.__dict__[variable]
    assert isinstance(graph, Pregel)
    out = graph.invoke({"prompt": "Describe the sea."})
    assert out["best"] == "a much longer candidate answer"
    assert out["messages"][-1].content == out["best"]
    assert len(out["scores"]) == 3

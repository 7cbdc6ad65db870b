"""Every Python block in README.md and docs/*.md runs, as pasted, so no snippet rots.

Each ```python block is run in a subprocess of its own (``sys.executable`` on a temp file,
in an empty temp directory, with a timeout) and must exit 0. Blocks are written like user
code and reach one of two model sources, both offline:

- the embedded SmolLM2 model (recipe ``local``, ``local_chat_model()``): real answers,
  seconds per call on 2 cores, so only a few blocks use it;
- "OpenAI", that is the scripted OpenAI-compatible server (`ScriptedOpenAIServer`) on
  127.0.0.1, through ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` in the block's environment:
  ``ChatOpenAI(model="gpt-4o-mini")`` or ``init_chat_model("openai:gpt-4o")`` answer with
  the server's default reply (any model name; tool calls and JSON fitted to the schema).

A block that cannot run offline is not a ```python block. The escape hatch, for the rare
block that must stay Python without running, is an HTML comment on the line right before
its fence: ``<!-- not-run: reason -->``; those are reported as skipped with the reason,
and `test_not_run_blocks_are_rare` counts them.

TOML and YAML config examples that describe a whole MoA (they have an aggregator table)
are validated by the package's own config loader, so they cannot rot either.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from langchain_moa.testing import API_KEY, ScriptedOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 600  # an embedded-model block on a busy 2-core machine; typically 10-40 s
MAX_NOT_RUN = 2

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.+?)\s*-->")
_LOCAL_HINTS = ('"local"', "local_chat_model", "provider = \"local\"", "'local'")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def uses_local_model(self) -> bool:
        return any(hint in self.code for hint in _LOCAL_HINTS)


def blocks(path: Path) -> list[Block]:
    """Fenced code blocks of one Markdown file (indented fences in lists included)."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening or not opening["lang"]:
            i += 1
            continue
        indent = opening["indent"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: code block never closed")
        previous = lines[i - 1] if i else ""
        marker = _NOT_RUN.search(previous)
        code = textwrap.dedent("\n".join(body)) if indent else "\n".join(body)
        found.append(
            Block(path, i + 1, opening["lang"], code + "\n", marker["reason"] if marker else None)
        )
        i = j + 1
    return found


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
CONFIG_BLOCKS = [
    b
    for b in ALL_BLOCKS
    if (b.lang == "toml" and "[aggregator]" in b.code)
    or (b.lang in ("yaml", "yml") and "aggregator:" in b.code)
]


def _param(block: Block) -> object:
    marks = [pytest.mark.local_model] if block.uses_local_model else [pytest.mark.http]
    if block.not_run:
        marks.append(pytest.mark.skip(reason=f"not-run: {block.not_run}"))
    return pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="session")
def openai_env() -> dict[str, str]:
    """The environment a block runs in: "OpenAI" is the scripted server on 127.0.0.1."""
    with ScriptedOpenAIServer() as server:
        env = {
            k: v
            for k, v in os.environ.items()
            # no real credentials or endpoints leak into a snippet's run
            if not k.endswith("_API_KEY") and not k.endswith("_BASE_URL")
            and k not in ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "MOA_SERVE_API_KEY")
        }
        env.update(
            OPENAI_BASE_URL=server.base_url,
            OPENAI_API_KEY=API_KEY,
            HF_HUB_OFFLINE="1",
            LANGSMITH_TRACING="false",
            LANGCHAIN_TRACING_V2="false",
            PYTHONUNBUFFERED="1",
        )
        yield env


def test_every_doc_has_been_read() -> None:
    names = {p.name for p in DOC_FILES}
    assert "README.md" in names and len(names) > 1
    assert PYTHON_BLOCKS, "no ```python block found: the collector is broken"


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON_BLOCKS])
def test_python_block_runs_as_pasted(
    block: Block, openai_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=workdir,
            env=openai_env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{block.id}: no exit within {TIMEOUT_S} s\n--- stdout\n{exc.stdout}\n"
            f"--- stderr\n{exc.stderr}"
        )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode} after {elapsed:.1f} s\n"
        f"--- code\n{block.code}--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in CONFIG_BLOCKS])
def test_config_example_loads(block: Block) -> None:
    """A whole-MoA TOML/YAML example passes the package's own config validation."""
    from langchain_moa.recipes import recipe_from_dict

    if block.lang == "toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        data = tomllib.loads(block.code)
    else:
        import yaml

        data = yaml.safe_load(block.code)
    recipe = recipe_from_dict(data, source=block.id)
    # every value the example sets is the value the loaded recipe holds: none dropped,
    # renamed or defaulted on the way in
    assert not _not_held(recipe, data), _not_held(recipe, data)


def _not_held(loaded: object, example: object, where: str = "") -> list[str]:
    """The paths of the example's values that `loaded` does not hold as written."""
    if isinstance(example, dict):
        return [
            problem
            for key, value in example.items()
            for problem in _not_held(getattr(loaded, key, _MISSING), value, f"{where}.{key}")
        ]
    if isinstance(example, list):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(example):
            return [f"{where}: {loaded!r} is not the example's {len(example)} items"]
        return [
            problem
            for i, item in enumerate(example)
            for problem in _not_held(loaded[i], item, f"{where}[{i}]")
        ]
    if loaded != example or isinstance(loaded, bool) != isinstance(example, bool):
        return [f"{where}: the example says {example!r}, the recipe holds {loaded!r}"]
    return []


_MISSING = object()


def test_not_run_blocks_are_rare() -> None:
    skipped = [f"{b.id} ({b.not_run})" for b in PYTHON_BLOCKS if b.not_run]
    print(f"{len(PYTHON_BLOCKS)} python blocks, {len(skipped)} marked not-run: {skipped}")
    assert len(skipped) <= MAX_NOT_RUN, f"too many not-run blocks: {skipped}"

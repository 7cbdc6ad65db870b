"""The README's two commands are the ones the project really runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Run the tests:", 1)[1]
    test_command = _bash_blocks(section)[0]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_quickstart_is_one_command_that_chats_on_the_local_model() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("Run the tests:", 1)[0]
    blocks = _bash_blocks(quickstart)
    assert len(blocks) == 1 and "\n" not in blocks[0]
    assert "moa pull" in blocks[0] and "moa chat" in blocks[0]

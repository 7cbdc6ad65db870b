"""What the benchmark scripts share: where results go, how they are written and shown.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and
they import this module as ``_common``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def write_results(name: str, data: dict[str, Any], indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``results/<name>``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table (the docs quote these)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

"""What the quality benchmarks share: one run table in `<stem>.json`, its report in `<stem>.md`."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = Callable[[list[dict[str, Any]], dict[str, Any]], str]


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` over seeds (one value alone as it is)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def save(out: Path, stem: str, meta: dict[str, Any], runs: list[dict[str, Any]], report: Report) -> str:
    """Write the runs and their report; the report's text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    text = report(runs, meta)
    (out / f"{stem}.md").write_text(text)
    return text


def rewrite(out: Path, stem: str, report: Report) -> str:
    """`--report-only`: the report again from the saved runs."""
    raw = json.loads((out / f"{stem}.json").read_text())
    return save(out, stem, raw["meta"], raw["runs"], report)

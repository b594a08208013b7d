"""The summary table at the top of BENCHMARKS.md: one row per target of `make bench`.

The interface between a bench section and the summary (every section follows it):

- A section is a function returning its markdown lines (a `## ` heading first). While it
  measures, it hands each of its targets to the summary with
  `summary.record(target, value, met)`:
  `target` says what is measured and the bar (`"Python loop, torch_hf_loss: tokens/s vs PEFT >= 1.5x"`),
  `value` is the measured value as text (`"1.62x"`), `met` is True / False, or None when it was not
  measured (the value then says why).
- A section in a module of its own (e.g. benches/gen_bench.py, issue 25 item 3) exposes
  `bench_generation(model_dir: Path, quick: bool) -> list[str]` (its markdown) and
  `rows() -> list[dict]` (its rows after that run: `{"target": str, "value": str, "met": bool | None}`);
  bench.py calls both when the module exists and adds the rows with `summary.extend(rows())`.

`table()` renders the rows with the date and the commit (`git rev-parse --short HEAD`, `-dirty` when
the tree has changes), in the order they were recorded.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_ROWS: list[dict[str, Any]] = []


def record(target: str, value: str, met: bool | None) -> None:
    """Adds one target's row (see the module docstring)."""
    _ROWS.append({"target": target, "value": value, "met": met})


def extend(rows: list[dict[str, Any]]) -> None:
    """Adds rows given as dicts (a module's `rows()`); a row without the three keys is refused."""
    for r in rows:
        missing = {"target", "value", "met"} - set(r)
        if missing:
            raise ValueError(f"summary row {r!r} lacks {sorted(missing)}")
        record(str(r["target"]), str(r["value"]), r["met"])


def rows() -> list[dict[str, Any]]:
    """The rows recorded so far (copies)."""
    return [dict(r) for r in _ROWS]


def commit() -> str:
    """`git rev-parse --short HEAD`, with `-dirty` when tracked files have changes; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def mark(met: bool | None, value: str = "") -> str:
    """met / MISSED; a row without a verdict is "no target" (a figure only) or "not measured"."""
    if met is None:
        return "not measured" if value.startswith("not measured") else "no target"
    return "met" if met else "MISSED"


def table(when: datetime.date | None = None, rev: str | None = None) -> list[str]:
    """The summary section: every recorded row with met / MISSED / no target / not measured."""
    when = when or datetime.date.today()
    rev = rev or commit()
    lines = [
        "## Summary of the targets",
        "",
        f"`make bench` of {when.isoformat()} at commit `{rev}`; each row's table below says how it was measured.",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {r['target']} | {r['value']} | {mark(r['met'], r['value'])} |" for r in _ROWS]
    return lines + [""]

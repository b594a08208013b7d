"""Markdown summary of the criterion results of `cargo bench --bench lora_linear`.

criterion (0.7) writes, per benchmark, `<target dir>/criterion/<group>/<function>/<value>/new/`
with `benchmark.json` (its `group_id`, `function_id`, `value_str`) and `estimates.json` (the
`median.point_estimate` in ns, among others). benches/lora_linear.rs names its functions
`loratch<suffix>` and `raw_tch<suffix>` (same group and value), which pairs them here.

    python benches/criterion_summary.py [CRITERION_DIR]   # prints the table
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# The groups of benches/lora_linear.rs, in the order of the table.
LORA_LINEAR_GROUPS = ("forward", "forward_backward", "forward_1row", "merge", "causal_attention")


@dataclass(frozen=True)
class Result:
    group: str
    function: str
    value: str
    median_ns: float
    mtime: float

    @property
    def name(self) -> str:
        return f"{self.group}/{self.function}/{self.value}"


def criterion_dir(target_dir: str | os.PathLike[str] | None = None) -> Path:
    """`<target dir>/criterion`, the target dir being `target_dir`, else `$CARGO_TARGET_DIR`, else
    `target` at the repository root."""
    if target_dir is None:
        target_dir = os.environ.get("CARGO_TARGET_DIR") or Path(__file__).resolve().parent.parent / "target"
    return Path(target_dir) / "criterion"


def load_results(
    crit_dir: Path, groups: Iterable[str] | None = None, since: float | None = None
) -> list[Result]:
    """Every `new/` result under `crit_dir` (of `groups` only, when given; written at or after the
    epoch time `since` only, when given, to leave out stale results of earlier runs), in the
    order they were written."""
    wanted = set(groups) if groups is not None else None
    out = []
    for est in crit_dir.glob("**/new/estimates.json"):
        meta = json.loads((est.parent / "benchmark.json").read_text())
        if wanted is not None and meta["group_id"] not in wanted:
            continue
        mtime = est.stat().st_mtime
        if since is not None and mtime < since:
            continue
        median = json.loads(est.read_text())["median"]["point_estimate"]
        out.append(
            Result(meta["group_id"], meta["function_id"] or "", meta["value_str"] or "", float(median), mtime)
        )
    return sorted(out, key=lambda r: r.mtime)


def table_lines(results: list[Result], groups: Iterable[str] | None = None) -> list[str]:
    """Markdown table: bench, median µs, and on `loratch*` rows the ratio to the matching
    `raw_tch*` row (>1 means loratch is slower). Rows follow `groups` order, then write order.
    A note line follows for every group/value with both `loratch_unmerged` and `loratch_merged`."""
    order = {g: i for i, g in enumerate(groups)} if groups is not None else {}
    results = sorted(results, key=lambda r: order.get(r.group, len(order)))  # stable: keeps write order
    by_key = {(r.group, r.function, r.value): r for r in results}
    lines = ["| bench | median µs | loratch / raw tch |", "|---|---|---|"]
    notes = []
    for r in results:
        ratio = ""
        if r.function.startswith("loratch"):
            ref = by_key.get((r.group, "raw_tch" + r.function[len("loratch") :], r.value))
            if ref is not None:
                ratio = f"{r.median_ns / ref.median_ns:.2f}"
        elif r.function.startswith("raw_tch"):
            ratio = "(reference)"
        lines.append(f"| {r.name} | {r.median_ns / 1e3:.1f} | {ratio} |")
        if r.function == "loratch_merged":
            unmerged = by_key.get((r.group, "loratch_unmerged", r.value))
            if unmerged is not None:
                notes.append(
                    f"- {r.group} {r.value}: loratch unmerged vs merged "
                    f"{100 * (unmerged.median_ns / r.median_ns - 1):+.1f}%"
                )
    return lines + ([""] + notes if notes else [])


def summary_lines(
    crit_dir: Path | None = None, groups: Iterable[str] | None = LORA_LINEAR_GROUPS, since: float | None = None
) -> list[str]:
    """The table (and notes) of the lora_linear results under `crit_dir` (default: see
    `criterion_dir`). Raises FileNotFoundError when there are none."""
    crit_dir = crit_dir if crit_dir is not None else criterion_dir()
    groups = tuple(groups) if groups is not None else None
    results = load_results(crit_dir, groups, since)
    if not results:
        raise FileNotFoundError(f"no criterion results under {crit_dir}")
    return table_lines(results, groups)


if __name__ == "__main__":
    print("\n".join(summary_lines(Path(sys.argv[1]) if len(sys.argv) > 1 else None)))

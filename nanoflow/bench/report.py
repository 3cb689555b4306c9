"""Offline-benchmark reporting: one rich table per run, and the raw results as JSON."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

# (header, row key, format); numbers are right-aligned so columns compare at a glance.
_COLUMNS = (
    ("requests", "num_requests", "{:d}"),
    ("input tok", "input_tokens", "{:d}"),
    ("output tok", "output_tokens", "{:d}"),
    ("elapsed s", "elapsed_s", "{:.1f}"),
    ("total tok/s", "total_tokens_per_s", "{:.1f}"),
    ("output tok/s", "output_tokens_per_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.3f}"),
    ("% of optimal", "pct_of_optimal", "{:.1f}%"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def print_summary(rows: list[dict], title: str, console: Console | None = None) -> None:
    """Print a table of throughput rows; the first row is ours, and the last column is
    ours' total tok/s divided by that row's (so 2.00x means ours is twice as fast). A row may lack the
    throughput keys (a peer that could not run: "-" cells); each row's "note" is printed under the table.
    Rows with a "round" (`--repeats`) are compared with ours of their round, the round's first row."""
    table = Table(title=title)
    table.add_column("system", style="bold")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("ours ÷ this", justify="right")
    ours = _ours_by_round(rows)
    for row in rows:
        ratio = _ratio(row, ours)
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        name = str(row.get("system", "?")) + (f" #{row['round']}" if "round" in row else "")
        table.add_row(name, *(_cell(row, k, f) for _, k, f in _COLUMNS), ratio)
    if console is None:  # pipes and CI logs default to 80 columns, which would elide the numbers
        console = _wide_console()
    console.print(table)
    for row in rows:
        if row.get("note"):
            console.print(f"{row.get('system', '?')}: {row['note']}", markup=False, highlight=False)


def _wide_console() -> Console:
    return Console(width=max(Console().width, 150))


def _ours_by_round(rows: list[dict]) -> dict:
    """Round (None: no rounds) -> ours' row: the first row of each round."""
    ours: dict = {}
    for row in rows:
        ours.setdefault(row.get("round"), row)
    return ours


def _ratio(row: dict, ours: dict) -> float | None:
    """Ours' total tok/s over this row's, ours of the row's round (None: either has no throughput)."""
    mine, theirs = row.get("total_tokens_per_s"), ours[row.get("round")].get("total_tokens_per_s")
    return theirs / mine if theirs and mine else None


def print_rounds(rows: list[dict]) -> None:
    """`--repeats`: per peer, ours ÷ it in each round and the median of those ratios."""
    ours = _ours_by_round(rows)
    if len(ours) < 2:
        return
    ratios: dict[str, list[float]] = {}
    for row in rows:
        if (ratio := _ratio(row, ours)) is not None and row is not ours[row.get("round")]:
            ratios.setdefault(str(row.get("system", "?")), []).append(ratio)
    console = _wide_console()
    for name, rs in ratios.items():
        each = ", ".join(f"{r:.2f}x" for r in rs)
        console.print(f"ours ÷ {name}: median {statistics.median(rs):.2f}x over {len(rs)} interleaved rounds ({each})",
                      markup=False, highlight=False)


def print_breakdown(rows: list[tuple[str, float, float]], title: str) -> None:
    """(part, seconds, % of wall) rows from nanoflow.profiling.breakdown."""
    table = Table(title=title)
    for header in ("part", "seconds", "% of wall"):
        table.add_column(header, justify="left" if header == "part" else "right")
    for name, secs, pct in rows:
        table.add_row(name, f"{secs:.2f}", f"{pct:.1f}%")
    _wide_console().print(table)


def print_step_breakdown(rows: list[dict]) -> None:
    """Per-step CPU time by part and device idle time (LLMEngine.stats.breakdown) of our runs."""
    cols = (("steps", "steps", "{:d}"), ("total tok/s", "total_tokens_per_s", "{:.1f}"),
            ("schedule ms", "schedule_ms", "{:.2f}"), ("prepare ms", "prepare_ms", "{:.2f}"),
            ("tokens+detok+stop ms", "process_ms", "{:.2f}"), ("CPU ms/step", "cpu_ms", "{:.2f}"),
            ("device ms/step", "device_ms", "{:.1f}"), ("device idle", "device_idle_pct", "{:.1f}%"))
    table = Table(title="engine thread CPU time per step, and device idle time between steps")
    table.add_column("system", style="bold")
    for header, _, _ in cols:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(str(row.get("system", "?")), *(_cell(row, k, f) for _, k, f in cols))
    _wide_console().print(table)


def write_json(path: str, payload: Any) -> None:
    """Write results as indented JSON, creating parent folders; non-JSON values (dtypes) become strings."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.write("\n")

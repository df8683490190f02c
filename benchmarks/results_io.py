"""Writing benchmark results as ``../shared/BENCHMARKS.md`` asks: one JSON per variant and one
markdown table over every variant in the folder."""

from __future__ import annotations

import json
from pathlib import Path

from amalgam.server.report import markdown_table, ordered_rows


def write_results(
    record: dict,
    folder: Path,
    variants: list[str],
    decimals: int = 1,
    raw_rows: tuple[str, ...] = (),
) -> str:
    """Write ``<benchmark>-<variant>.json``, then ``<benchmark>.md`` with a column per variant
    found in ``folder`` (ordered as ``variants``, then any other by name); returns the
    markdown. Rows are fractions shown as percentages, except those starting with one of
    ``raw_rows`` (seconds, bytes), shown as they are."""
    name = record["benchmark"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{record['variant']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    records = sorted(
        (json.loads(p.read_text()) for p in folder.glob(f"{name}-*.json")),
        key=lambda r: (
            variants.index(r["variant"]) if r["variant"] in variants else len(variants),
            r["variant"],
        ),  # named variants first, then others (e.g. ``n1-width64``) by name
    )
    rows = ordered_rows({row: 0.0 for r in records for row in r["results"]})

    def cell(r: dict, row: str) -> str:
        if row not in r["results"]:
            return ""
        if row.startswith(raw_rows) and raw_rows:
            return f"{r['results'][row]:g}"
        return f"{100 * r['results'][row]:.{decimals}f}"

    table = markdown_table(
        ["row"] + [r["variant"] for r in records],
        [[row] + [cell(r, row) for r in records] for row in rows],
    )
    notes = "\n".join(
        f"- {r['variant']}: {r['data']}; {r['budget']}; seed {r['seed']}; {r['wall_seconds']}s"
        for r in records
    )
    units = f"; {', '.join(raw_rows)} rows in their own units" if raw_rows else ""
    metric = records[0].get("metric", "accuracy")
    text = f"# {name} ({metric} %{units})\n\n{table}\n\n{notes}\n"
    (folder / f"{name}.md").write_text(text)
    return text

"""``report.html`` of a run folder: one self-contained page (figures embedded) with what
``report.md`` says, rendered from ``templates/report.html.j2`` with Jinja2."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from amalgam.server.report import ordered_rows, row_label

_environment = Environment(
    loader=PackageLoader("amalgam.server", "templates"), autoescape=select_autoescape()
)


def report_html(
    run_dir: Path,
    metrics: Mapping,
    summary: list[str],
    figures: list[str],
    per_class: Mapping[str, list] | None = None,
    class_names: list[str] | None = None,
    metric: str = "accuracy",
) -> str:
    """The page of the run in ``run_dir``: ``metrics`` as in ``metrics.json``, ``figures``
    the PNG files of the run folder to embed, in order."""
    job, results = metrics["job"], metrics["results"]
    rows = [
        {"name": row, "what": row_label(row), "percent": 100 * results[row],
         "kind": row.partition(":")[0]}
        for row in ordered_rows(results)
    ]  # fmt: skip
    embedded = [
        {"name": name, "data": base64.b64encode((run_dir / name).read_bytes()).decode()}
        for name in figures
    ]
    return _environment.get_template("report.html.j2").render(
        job=job,
        job_id=metrics["job_id"],
        params=", ".join(f"{k} {v}" for k, v in job["method"]["params"].items()),
        wall_seconds=metrics["wall_seconds"],
        summary=summary,
        metric=metric,
        rows=rows,
        per_class=per_class,
        class_names=class_names or [],
        figures=embedded,
        stats=metrics["parties"],
    )

"""Tables for the terminal and the report of a run folder (``report.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ROW_ORDER = (
    "teacher:",
    "best_teacher",
    "ensemble:",
    "ensemble",
    "vanilla_kd",
    "student",
    "supervised",
)
ROW_LABELS = {
    "best_teacher": "best single teacher",
    "ensemble": "teachers' ensemble (the best rule, where several)",
    "vanilla_kd": "vanilla distillation (averaged soft labels)",
    "student": "fused student",
    "gold": "trained on all the parties' data together",
    "supervised": "supervised upper bound (true labels)",
}


QUALIFIERS = {"aligned": ", class priors aligned", "unaligned": ", class priors as answered"}


def row_label(row: str) -> str:
    kind, _, name = row.partition(":")
    name, _, qualifier = name.partition(":")
    said = QUALIFIERS.get(qualifier, f", {qualifier}" if qualifier else "")
    if kind == "teacher" and name:
        return "this party's teacher alone"
    if kind == "ensemble" and name:
        return f"teachers' ensemble, {name} rule{said}"
    if kind == "student" and name:
        return f"student trained with the {name} rule{said}"
    return ROW_LABELS.get(row, "")


def ordered_rows(results: Mapping[str, float]) -> list[str]:
    def rank(row: str) -> int:
        for i, prefix in enumerate(ROW_ORDER):
            if row == prefix or (prefix.endswith(":") and row.startswith(prefix)):
                return i
        return len(ROW_ORDER)

    return sorted(results, key=rank)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(results: Mapping[str, float], metric: str = "accuracy") -> str:
    """Rows in a fixed order, with what each means, as percentages."""
    rows = [[row, row_label(row), f"{100 * results[row]:.1f}"] for row in ordered_rows(results)]
    return markdown_table(["row", "what", f"{metric} %"], rows)


def party_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    rows = [
        [
            name,
            f"{s['seconds']:.2f}",
            str(int(s["calls"])),
            str(int(s.get("messages", s["calls"]))),
            str(int(s["samples"])),
            f"{s['bytes_sent'] / 1e6:.2f}",
            f"{s['bytes_received'] / 1e6:.2f}",
        ]
        for name, s in stats.items()
    ]
    return markdown_table(
        ["party", "time in calls s", "calls", "messages", "samples", "MB sent", "MB received"],
        rows,
    )


def per_class_table(per_class: Mapping[str, list], class_names: list[str]) -> str:
    rows = [
        [row] + ["" if v is None else f"{100 * v:.0f}" for v in values]
        for row, values in per_class.items()
    ]
    return markdown_table(["row", *class_names], rows)


def report_markdown(
    job: Mapping,
    results: Mapping[str, float],
    summary: list[str],
    stats: Mapping[str, Mapping[str, float]],
    figures: list[str],
    per_class: Mapping[str, list] | None = None,
    class_names: list[str] | None = None,
    metric: str = "accuracy",
) -> str:
    params = ", ".join(f"{k} {v}" for k, v in job["method"]["params"].items())
    lines = [
        f"# Job {job['name']}",
        "",
        f"Method: {job['method']['name']} ({params}); student {job['student']['arch']}; "
        f"seed {job['seed']}.",
        *summary,
        "",
        f"## {metric.capitalize() if metric.islower() else metric}",
        "",
        results_table(results, metric),
        "",
    ]
    if per_class:
        lines += ["## Accuracy per class, %", "", per_class_table(per_class, class_names), ""]
    lines += [f"![{Path(name).stem}]({name})" for name in figures]
    lines += ["", "## Parties", "", party_table(stats), ""]
    return "\n".join(lines)

"""Tables for the terminal and ``report.md``."""

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
    "ensemble": "best ensemble rule",
    "vanilla_kd": "vanilla distillation (averaged soft labels)",
    "student": "composed student",
    "supervised": "supervised upper bound (true labels)",
}


def row_label(row: str) -> str:
    kind, _, name = row.partition(":")
    if kind == "teacher" and name:
        return "this party's teacher alone"
    if kind == "ensemble" and name:
        return f"teachers' ensemble, {name} rule"
    if kind == "student" and name:
        return f"student trained with the {name} rule"
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


def results_table(results: Mapping[str, float]) -> str:
    rows = [[row, row_label(row), f"{100 * results[row]:.1f}"] for row in ordered_rows(results)]
    return markdown_table(["row", "what", "accuracy %"], rows)


def party_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    rows = [
        [
            name,
            f"{s['seconds']:.2f}",
            str(int(s["calls"])),
            str(int(s["samples"])),
            f"{s['bytes_sent'] / 1e6:.2f}",
            f"{s['bytes_received'] / 1e6:.2f}",
        ]
        for name, s in stats.items()
    ]
    return markdown_table(
        ["party", "time in calls s", "calls", "samples", "MB sent", "MB received"], rows
    )


def report_markdown(
    job: Mapping,
    results: Mapping[str, float],
    extra: Mapping,
    stats: Mapping[str, Mapping[str, float]],
) -> str:
    params = job["method"]["params"]
    lines = [
        f"# Job {job['name']}",
        "",
        f"Method: {job['method']['name']} (rule {params['rule']}, entropy threshold "
        f"{params['entropy_threshold']}, {params['targets']} targets); student "
        f"{job['student']['arch']}, {job['student']['epochs']} epochs; seed {job['seed']}.",
        f"Data: unlabeled {job['data']['unlabeled']} ({extra['unlabeled']} images), "
        f"test {job['data']['test']} ({extra['test']} images of the union classes).",
        f"Pseudo-labels kept: {100 * extra['retention']:.1f}%"
        + (
            f", of which correct: {100 * extra['pseudo_label_accuracy']:.1f}%"
            if "pseudo_label_accuracy" in extra
            else ""
        )
        + ".",
        "",
        "## Accuracy on the union classes",
        "",
        results_table(results),
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Parties",
        "",
        party_table(stats),
        "",
    ]
    return "\n".join(lines)


def plot_accuracy(results: Mapping[str, float], path: Path) -> None:
    """A horizontal bar per row (teachers, ensembles, baselines, student), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ordered_rows(results) if r not in ("best_teacher", "ensemble")]
    colours = {"student": "tab:green", "supervised": "tab:gray", "vanilla_kd": "tab:orange"}
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    axes.barh(
        rows, [100 * results[r] for r in rows], color=[colours.get(r, "tab:blue") for r in rows]
    )
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy on the union classes, %")
    for y, row in enumerate(rows):
        axes.text(100 * results[row] + 0.5, y, f"{100 * results[row]:.1f}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

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
    "ensemble": "teachers' ensemble (the best rule, where several)",
    "vanilla_kd": "vanilla distillation (averaged soft labels)",
    "student": "fused student",
    "gold": "trained on all the parties' data together",
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
            str(int(s["samples"])),
            f"{s['bytes_sent'] / 1e6:.2f}",
            f"{s['bytes_received'] / 1e6:.2f}",
        ]
        for name, s in stats.items()
    ]
    return markdown_table(
        ["party", "time in calls s", "calls", "samples", "MB sent", "MB received"], rows
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


def plot_accuracy(results: Mapping[str, float], path: Path, metric: str = "accuracy") -> None:
    """A horizontal bar per row (teachers, ensembles, baselines, student), as a PNG."""
    plt = _pyplot()
    rows = [r for r in ordered_rows(results) if r not in ("best_teacher", "ensemble")]
    colours = {"student": "tab:green", "supervised": "tab:gray", "vanilla_kd": "tab:orange"}
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    axes.barh(
        rows, [100 * results[r] for r in rows], color=[colours.get(r, "tab:blue") for r in rows]
    )
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel(f"{metric} on the union classes, %")
    for y, row in enumerate(rows):
        axes.text(100 * results[row] + 0.5, y, f"{100 * results[row]:.1f}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(checkpoints: list, path: Path) -> None:
    """One row of generated images per checkpoint; each item is (N, C, H, W) in [0, 1]."""
    plt = _pyplot()
    rows, columns = len(checkpoints), len(checkpoints[0])
    figure, axes = plt.subplots(
        rows, columns, figsize=(columns * 0.6, rows * 0.6 + 0.3), squeeze=False
    )
    for r, images in enumerate(checkpoints):
        for c, image in enumerate(images):
            picture = image.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()  # (H, W[, C])
            axes[r][c].imshow(picture, cmap="gray", vmin=0, vmax=1)
            axes[r][c].axis("off")
    figure.suptitle("generated samples, one row per checkpoint (first: untrained)", fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(history: Mapping[str, list[float]], path: Path) -> None:
    """Loss curves, one panel per model (generator k, assistant k, student)."""
    plt = _pyplot()
    groups: dict[str, list[str]] = {}
    for key in history:
        groups.setdefault(key.split("/")[0], []).append(key)
    figure, axes = plt.subplots(len(groups), 1, figsize=(7, 2.2 * len(groups)), squeeze=False)
    for ax, (group, keys) in zip(axes[:, 0], groups.items()):
        for key in keys:
            ax.plot(history[key], label=key.split("/", 1)[1], linewidth=0.8)
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1][0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_heatmap(
    matrix, path: Path, *, title: str, marks: list[tuple[int, int]] | None = None
) -> None:
    """A (rows, cols) matrix such as linear CKA between two networks' layers, values printed;
    ``marks`` outlines cells (row, col), e.g. a cross-layer alignment."""
    plt = _pyplot()
    rows, cols = len(matrix), len(matrix[0])
    figure, axes = plt.subplots(figsize=(1.0 * cols + 2, 0.7 * rows + 1.2))
    image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    for r in range(rows):
        for c in range(cols):
            axes.text(
                c,
                r,
                f"{matrix[r][c]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[r][c] < 0.6 else "black",
            )
    for r, c in marks or []:
        axes.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    axes.set_xticks(range(cols))
    axes.set_yticks(range(rows))
    axes.set_title(title, fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_transport_costs(costs: list[Mapping[str, float]], names: list[str], path: Path) -> None:
    """Transport cost <T, M> of each layer group, one line per network aligned to the base."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3))
    for name, per_group in zip(names, costs, strict=True):
        if per_group and any(per_group.values()):
            axes.plot(list(per_group), list(per_group.values()), marker="o", label=name)
    axes.set_ylabel("transport cost")
    axes.set_xlabel("layer group, input to output")
    axes.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

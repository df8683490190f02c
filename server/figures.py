"""The figures of a run folder and of the benchmarks: accuracy bars, generated samples, loss
curves, CKA heatmaps, transport costs, the student's confusion matrix. PNG files, drawn with
matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

from amalgam.server.report import ordered_rows

ROW_COLOURS = {  # the colour of a kind of row (``teacher:<party>``) or of a row, in every figure
    "teacher": "tab:blue",
    "best_teacher": "tab:blue",
    "ensemble": "tab:purple",
    "vanilla_kd": "tab:orange",
    "student": "tab:green",
    "gold": "tab:olive",
    "supervised": "tab:gray",
}
ROW_KINDS = {  # the kinds of row of a run's accuracy bars, with their legend entries
    "teacher": "one party's teacher",
    "ensemble": "teachers' ensemble (a rule)",
    "vanilla_kd": "vanilla distillation",
    "student": "fused student",
    "supervised": "supervised bound (true labels)",
}


def plot_accuracy(results: Mapping[str, float], path: Path, metric: str = "accuracy") -> None:
    """A horizontal bar per row (teachers, ensembles, baselines, student), coloured by kind
    with a legend, as a PNG."""
    plt = pyplot()
    rows = [r for r in ordered_rows(results) if r not in ("best_teacher", "ensemble")]
    kinds = [r.partition(":")[0] if r.partition(":")[0] in ROW_KINDS else "student" for r in rows]
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.4))
    axes.barh(rows, [100 * results[r] for r in rows], color=[ROW_COLOURS[k] for k in kinds])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel(f"{metric} on the union classes, %")
    for y, row in enumerate(rows):
        axes.text(100 * results[row] + 0.5, y, f"{100 * results[row]:.1f}", va="center", fontsize=8)
    shown = list(dict.fromkeys(kinds))
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROW_COLOURS[k]) for k in shown]
    figure.legend(handles, [ROW_KINDS[k] for k in shown], loc="lower center", fontsize=7,
                  ncol=min(3, len(shown)), frameon=False)  # fmt: skip
    legend_rows = -(-len(shown) // 3)
    height = figure.get_figheight()  # inches: keep the legend's rows below the axes
    figure.tight_layout(rect=(0, (0.15 + 0.2 * legend_rows) / height, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(checkpoints: list, path: Path) -> None:
    """One row of generated images per checkpoint; each item is (N, C, H, W) in [0, 1]."""
    plt = pyplot()
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
    """Loss curves, one panel per model (generator k, assistant k, student), one point per
    update step of that model (one batch), legends beside the panels."""
    plt = pyplot()
    groups: dict[str, list[str]] = {}
    for key in history:
        groups.setdefault(key.split("/")[0], []).append(key)
    figure, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 * len(groups)), squeeze=False)
    for ax, (group, keys) in zip(axes[:, 0], groups.items()):
        for key in keys:
            ax.plot(history[key], label=key.split("/", 1)[1], linewidth=0.8)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel("value", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1][0].set_xlabel("update step of that model (one batch each)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_heatmap(
    matrix,
    path: Path,
    *,
    title: str,
    marks: list[tuple[int, int]] | None = None,
    rows: tuple[str, list[str]] | None = None,
    columns: tuple[str, list[str]] | None = None,
) -> None:
    """A (rows, cols) matrix such as linear CKA between two networks' layers, values printed;
    ``marks`` outlines cells (row, col), e.g. a cross-layer alignment; ``rows`` and
    ``columns``: (axis label, one name per row or column), e.g. the layers' names."""
    plt = pyplot()
    n_rows, n_cols = len(matrix), len(matrix[0])
    figure, axes = plt.subplots(figsize=(0.9 * n_cols + 3.2, 0.6 * n_rows + 2.2))
    image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    for r in range(n_rows):
        for c in range(n_cols):
            colour = "white" if matrix[r][c] < 0.6 else "black"
            axes.text(c, r, f"{matrix[r][c]:.2f}", ha="center", va="center", fontsize=7,
                      color=colour)  # fmt: skip
    for r, c in marks or []:
        axes.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    row_title, row_names = rows or ("", [str(r) for r in range(n_rows)])
    column_title, column_names = columns or ("", [str(c) for c in range(n_cols)])
    axes.set_yticks(range(n_rows), row_names, fontsize=7)
    axes.set_xticks(range(n_cols), column_names, fontsize=7, rotation=45, ha="right")
    axes.set_ylabel(row_title, fontsize=8)
    axes.set_xlabel(column_title, fontsize=8)
    axes.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_transport_costs(costs: list[Mapping[str, float]], names: list[str], path: Path) -> None:
    """Transport cost <T, M> of each layer group, one line per network aligned to the base."""
    plt = pyplot()
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


def plot_confusion(class_names: list[str], matrix: list[list[int]], path: Path) -> None:
    """The confusion matrix as a PNG: rows the true class, columns the student's answer, each
    row normalised to 1 (the diagonal is the accuracy of the class), counts printed."""
    import numpy as np

    plt = pyplot()
    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    figure, axes = plt.subplots(figsize=(0.45 * k + 2.5, 0.45 * k + 1.8))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for r in range(k):
            for c in range(k):
                if counts[r, c]:
                    colour = "white" if shares[r, c] > 0.6 else "black"
                    axes.text(c, r, f"{int(counts[r, c])}", ha="center", va="center",
                              fontsize=7, color=colour)  # fmt: skip
    axes.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    axes.set_yticks(range(k), class_names, fontsize=7)
    axes.set_xlabel("the student's answer")
    axes.set_ylabel("true class")
    axes.set_title("student on the test set (share of each true class)", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# rows a benchmark figure colours (ROW_COLOURS), in the order of its bars
SUMMARY_ROWS = ("best_teacher", "ensemble", "vanilla_kd", "student", "gold", "supervised")
OTHER_ROW = "tab:cyan"  # a variant of the method, a baseline the benchmark adds


def benchmark_rows(record: dict, kinds_only: bool) -> list[tuple[str, float, str]]:
    """(label, value, colour) of one variant's bars: the best teacher (the best ``teacher:*``
    row where the benchmark names none), then every row without a ``:`` whose value is a
    fraction. Without such rows, each ``kind:name`` row, or with ``kinds_only`` each kind
    averaged over its names."""
    results = dict(record["results"])
    plain = [row for row, v in results.items() if ":" not in row and 0 <= v <= 1]
    teachers = [v for row, v in results.items() if row.startswith("teacher:")]
    if plain and teachers and "best_teacher" not in results:
        results["best_teacher"] = max(teachers)
        plain.append("best_teacher")
    plain.sort(key=lambda row: SUMMARY_ROWS.index(row) if row in SUMMARY_ROWS else 99)
    if plain:
        colour = {row: ROW_COLOURS[row] for row in SUMMARY_ROWS}
        return [(row, results[row], colour.get(row, OTHER_ROW)) for row in plain]
    if not kinds_only:
        return [(row, v, OTHER_ROW) for row, v in results.items() if 0 <= v <= 1]
    kinds: dict[str, list[float]] = {}
    for row, value in results.items():
        kinds.setdefault(row.partition(":")[0], []).append(value)
    return [(f"{kind} (mean of {len(vs)})", sum(vs) / len(vs), OTHER_ROW)
            for kind, vs in kinds.items() if all(0 <= v <= 1 for v in vs)]  # fmt: skip


def plot_benchmark(records: list[dict], path: Path) -> bool:
    """One benchmark's results in one figure (``records``: its result files, as read): a
    panel per variant with a bar per row (:func:`benchmark_rows`), the best teacher, the
    ensemble, the baselines and the student coloured as in the legend. Returns False,
    writing nothing, when no variant has rows that are fractions (times, bytes)."""
    panels = [(r["variant"], benchmark_rows(r, len(records) > 1)) for r in records]
    panels = [(variant, rows) for variant, rows in panels if rows]
    if not panels:
        return False
    plt = pyplot()
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    tallest = max(len(rows) for _, rows in panels)
    size = (4.2 * columns, (0.22 * tallest + 0.9) * lines + 0.8)  # inches
    figure, axes = plt.subplots(lines, columns, squeeze=False, figsize=size)
    metric = records[0].get("metric", "accuracy")
    for ax, (variant, rows) in zip(axes.flat, panels):
        labels = [label for label, _, _ in rows]
        ax.barh(labels, [100 * v for _, v, _ in rows], color=[c for _, _, c in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_title(variant, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(f"{metric}, %", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    shown = {c for _, rows in panels for _, _, c in rows}
    keys = [(ROW_COLOURS[row], row.replace("_", " ")) for row in SUMMARY_ROWS
            if ROW_COLOURS[row] in shown]  # fmt: skip
    keys += [(OTHER_ROW, "the method's variants, other baselines")] if OTHER_ROW in shown else []
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c, _ in keys]
    figure.legend(handles, [label for _, label in keys], loc="lower center", fontsize=7,
                  ncol=min(4, len(keys)), frameon=False)  # fmt: skip
    figure.suptitle(f"benchmark {records[0]['benchmark']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.5 / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True

"""A picture of the aggregation: canvases with every party's detections (before) and with the
pseudo-labels that survived the vote and Soft-NMS (after)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from amalgam.fusion.teacher import Detections


def pseudo_label_grid(
    images: Tensor,
    before: Sequence[Sequence[Detections]],
    after: Sequence[Detections],
    class_names: Sequence[str],
    path: Path,
    party_names: Sequence[str],
    count: int = 6,
) -> Path:
    """Save a 2 x ``count`` PNG: top row each party's detections on canvas i (one colour per
    party, named in the key below), bottom row the aggregated pseudo-labels.
    ``before[m][i]``: party ``party_names[m]`` on image i; (N, 1, S, S) ``images``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(count, images.shape[0])
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.6), squeeze=False)
    for i in range(count):
        rows = [list(enumerate(party[i] for party in before)), [(None, after[i])]]
        for row, entries in enumerate(rows):
            ax = axes[row][i]
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            for m, found in entries:
                colour = colours(m % 10) if m is not None else "lime"
                for (x1, y1, x2, y2), label, score in zip(
                    found.boxes.tolist(), found.labels.tolist(), found.scores.tolist()
                ):
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1,
                                           edgecolor=colour))  # fmt: skip
                    ax.text(x1, y1, f"{class_names[label]} {score:.2f}", color=colour,
                            fontsize=5, va="bottom")  # fmt: skip
        axes[0][i].set_title(f"canvas {i}", fontsize=7)
    axes[0][0].set_ylabel("every party", fontsize=8)
    axes[1][0].set_ylabel("pseudo-labels", fontsize=8)
    keys = [(colours(m % 10), f"party {name}") for m, name in enumerate(party_names)]
    keys.append(("lime", "aggregated pseudo-label"))
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=colour, lw=2) for colour, _ in keys]
    fig.legend(handles, [label for _, label in keys], loc="lower center", ncol=len(keys),
               fontsize=7, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path

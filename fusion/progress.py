"""Progress bars for long work: one place that decides how they look and when they show."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(
    total: int | None = None,
    desc: str = "",
    *,
    unit: str = "it",
    position: int = 0,
    show: bool = True,
    iterable=None,
) -> tqdm:
    """A bar over ``total`` units (or over ``iterable``) that disappears when done; with
    ``show=False`` nothing is drawn, and with ``show=True`` only on a terminal."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        position=position,
        leave=False,
        disable=None if show else True,
    )

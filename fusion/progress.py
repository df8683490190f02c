"""Progress of long work: one place that decides how it looks and when it shows.

On a terminal, a bar that disappears when done; off a terminal (output redirected to a file, a
container's log), one plain line every :data:`LINE_PERIOD_S` seconds and one at the end,
through the ``amalgam.progress`` logger, which the command line sends to stderr.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LINE_PERIOD_S = 30.0
logger = logging.getLogger("amalgam.progress")


class LineProgress(tqdm):
    """A :class:`tqdm` that logs whole lines ("train student: 40% (8/20 epoch), 1.2 epoch/s,
    ETA 00:10, loss=0.412") instead of redrawing a bar."""

    def __init__(self, iterable=None, total: int | None = None, **kwargs) -> None:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        bar_format = (
            "{desc}: {percentage:.0f}% ({n_fmt}/{total_fmt} {unit}), {rate_fmt}, ETA {remaining}"
            if total
            else "{desc}: {n_fmt} {unit}, {rate_fmt}"
        ) + "{postfix}"
        super().__init__(iterable, total=total, **kwargs, bar_format=bar_format,
                         mininterval=LINE_PERIOD_S, file=sys.stderr, disable=False,
                         leave=True)  # fmt: skip

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # tqdm passes a message only to clear or finish the bar; nothing done: nothing to say
        if msg is None and self.n:
            logger.info(self.format_meter(**self.format_dict))
        return True

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Kept for the next line, not a line of its own."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def close(self) -> None:
        if not self.disable and self.n and self.n != self.last_print_n:
            self.display()  # the end, unless the last line said it already
        self.disable = True  # tqdm's own close would draw the bar once more
        super().close()


def progress_bar(
    total: int | None = None,
    desc: str = "",
    *,
    unit: str = "it",
    position: int = 0,
    show: bool = True,
    iterable=None,
) -> tqdm:
    """Progress over ``total`` units (or over ``iterable``): a bar on a terminal, a
    :class:`LineProgress` off one; ``show=False``: nothing."""
    if show and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        position=position,
        leave=False,
        disable=not show,
    )

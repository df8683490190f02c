"""What every benchmark shares (``../shared/BENCHMARKS.md``): its command line (``--variant``,
``--quick``, ``--out``), where results go, the skip when a variant's data is absent, and the
results writer. A benchmark module keeps only its protocol: its variants, its own options and
how one variant runs.

    Benchmark("composition", __doc__, VARIANTS, run_variant).main()
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from amalgam.fusion.data import SourceUnavailable, shared_data_dir
from amalgam.server.figures import plot_benchmark
from amalgam.server.report import markdown_table, ordered_rows

RESULTS = Path(__file__).resolve().parent / "results"


def record(
    name: str,
    variant: str,
    *,
    data: str,
    seed: int | list[int],
    budget: str,
    results: dict[str, float],
    started: float,
    extra: dict | None = None,
    metric: str = "accuracy",
) -> dict:
    """One run's result in the shape BENCHMARKS.md sets; ``started`` is the
    :func:`time.perf_counter` at its start."""
    return {
        "benchmark": name,
        "variant": variant,
        "data": data,
        "seed": seed,
        "budget": budget,
        "metric": metric,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "extra": extra or {},
    }


@dataclass
class Results:
    """A benchmark's results folder: one JSON per variant and one markdown table over every
    variant found there (named variants first, in order, then any other by name).

    Rows are fractions shown as percentages with ``decimals``, except those starting with one
    of ``raw_rows`` (seconds, bytes), shown as they are; ``markdown``, where given, writes the
    table instead; ``figure``: also draw the variants in ``<benchmark>.png``, linked below the
    table."""

    folder: Path
    benchmark: str
    variants: Sequence[str]
    decimals: int = 1
    raw_rows: tuple[str, ...] = ()
    markdown: Callable[[list[dict]], str] | None = None
    figure: bool = True  # <benchmark>.png, :func:`amalgam.server.figures.plot_benchmark`

    def write(self, result: dict) -> str:
        """Write ``result`` and the table; returns the table (printed too)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.benchmark}-{result['variant']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        order = list(self.variants)
        records = sorted(
            (json.loads(p.read_text()) for p in self.folder.glob(f"{self.benchmark}-*.json")),
            key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order),
                           r["variant"]),
        )  # fmt: skip
        text = (self.markdown or self._table)(records)
        if self.figure and plot_benchmark(records, self.folder / f"{self.benchmark}.png"):
            text += f"\n![{self.benchmark}]({self.benchmark}.png)\n"
        (self.folder / f"{self.benchmark}.md").write_text(text)
        print(text, flush=True)
        return text

    def _table(self, records: list[dict]) -> str:
        rows = ordered_rows({row: 0.0 for r in records for row in r["results"]})

        def cell(r: dict, row: str) -> str:
            if row not in r["results"]:
                return ""
            if self.raw_rows and row.startswith(self.raw_rows):
                return f"{r['results'][row]:g}"
            return f"{100 * r['results'][row]:.{self.decimals}f}"

        table = markdown_table(
            ["row"] + [r["variant"] for r in records],
            [[row] + [cell(r, row) for r in records] for row in rows],
        )
        notes = "\n".join(
            f"- {r['variant']}: {r['data']}; {r['budget']}; seed {r['seed']}; {r['wall_seconds']}s"
            for r in records
        )
        units = f"; {', '.join(self.raw_rows)} rows in their own units" if self.raw_rows else ""
        metric = records[0].get("metric", "accuracy")
        return f"# {self.benchmark} ({metric} %{units})\n\n{table}\n\n{notes}\n"


# run(variant, args, results): one variant's protocol; it writes what it measured with
# ``results.write(record)`` (as often as it likes: a long run keeps what it has) and raises
# SourceUnavailable when its data is not on this machine
Run = Callable[[str, argparse.Namespace, Results], None]


@dataclass
class Benchmark:
    """One benchmark's command line around its protocol.

    Attributes
    ----------
    name : results are ``<name>-<variant>.json`` and ``<name>.md``.
    description : the module docstring; its first line is ``--help``'s.
    variants : every variant, in the order of the table's columns.
    run : runs one variant (see :data:`Run`).
    options : adds the benchmark's own arguments to the parser.
    results : options of the results table (``decimals``, ``raw_rows``, ``markdown``).
    """

    name: str
    description: str
    variants: Sequence[str]
    run: Run
    options: Callable[[argparse.ArgumentParser], None] | None = None
    results: dict = field(default_factory=dict)

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=self.description.splitlines()[0])
        parser.add_argument("--variant", choices=list(self.variants), action="append",
                            help="run only these (repeatable)")  # fmt: skip
        parser.add_argument("--quick", action="store_true",
                            help="a tiny budget, results to a temporary folder")  # fmt: skip
        parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS})")
        if self.options is not None:
            self.options(parser)
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Run the asked variants; a variant whose data is absent is skipped with its reason,
        and with none runnable the benchmark says ``skipped`` and exits 0."""
        args = self.parser().parse_args(argv)
        folder = args.out or (
            Path(tempfile.mkdtemp(prefix=f"{self.name}-quick-")) if args.quick else RESULTS
        )
        folder.mkdir(parents=True, exist_ok=True)  # figures may be written before any result
        results = Results(folder, self.name, self.variants, **self.results)
        ran = 0
        for variant in args.variant or self.variants:
            print(f"{self.name} {variant} ...", flush=True)
            try:
                self.run(variant, args, results)
            except SourceUnavailable as error:
                print(f"{variant} skipped: {error}", flush=True)
                continue
            ran += 1
        if not ran:
            print(f"skipped: no variant's data is available (looked in {shared_data_dir()})")
            return 0
        print(f"results in {folder}")
        return 0

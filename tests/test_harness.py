"""benchmarks/harness.py: every benchmark's command line, results folder, skip when its data
is absent, and results in the shape ../shared/BENCHMARKS.md sets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from amalgam.fusion.data import SourceUnavailable
from benchmarks.harness import RESULTS, Benchmark, record

KEYS = {"benchmark", "variant", "data", "seed", "budget", "metric", "wall_seconds", "results",
        "extra"}  # fmt: skip


def _measured(variant, args, results):
    results.write(
        record("toy", variant, data="none", seed=0, budget=f"quick={args.quick}",
               results={"teacher:a": 0.5, "student": 0.875}, started=time.perf_counter())
    )  # fmt: skip


def test_results_are_one_json_per_variant_and_one_table(tmp_path, capsys):
    def plotted_first(variant, args, results):
        (results.folder / f"{variant}.png").write_bytes(b"")  # a figure before any result
        _measured(variant, args, results)

    toy = Benchmark("toy", "A toy.\n\nMore.", ["small", "large"], plotted_first)
    tmp_path = tmp_path / "new"
    assert toy.main(["--out", str(tmp_path)]) == 0
    small = json.loads((tmp_path / "toy-small.json").read_text())
    assert set(small) == KEYS and small["results"]["student"] == 0.875
    assert small["budget"] == "quick=False"
    table = (tmp_path / "toy.md").read_text()
    assert "| row | small | large |" in table and "| student | 87.5 | 87.5 |" in table
    assert f"results in {tmp_path}" in capsys.readouterr().out
    # one figure of every variant, linked below the table
    assert (tmp_path / "toy.png").read_bytes().startswith(b"\x89PNG")
    assert table.rstrip().endswith("![toy](toy.png)")


def test_a_benchmark_figure_has_a_panel_per_variant_and_none_without_fractions(tmp_path):
    from amalgam.server.figures import benchmark_rows, plot_benchmark

    composed = {
        "variant": "a",
        "benchmark": "b",
        "results": {
            "teacher:x": 0.5,
            "teacher:y": 0.6,
            "ensemble": 0.8,
            "student": 0.9,
            "seconds": 12.0,
        },
    }
    rows = benchmark_rows(composed, kinds_only=False)
    assert [(label, value) for label, value, _ in rows] == [
        ("best_teacher", 0.6),
        ("ensemble", 0.8),
        ("student", 0.9),
    ]  # no seconds
    tasks = {"variant": "c", "benchmark": "b", "results": {"kd:t1": 0.4, "kd:t2": 0.6}}
    assert [(label, value) for label, value, _ in benchmark_rows(tasks, kinds_only=True)] == [
        ("kd (mean of 2)", 0.5)
    ]
    assert plot_benchmark([composed, tasks], tmp_path / "b.png")
    timing = {"variant": "t", "benchmark": "b", "results": {"img_per_s": 900.0}}
    assert not plot_benchmark([timing], tmp_path / "t.png") and not (tmp_path / "t.png").exists()


def test_quick_runs_write_to_a_temporary_folder(capsys):
    toy = Benchmark("toy", "A toy.", ["small"], _measured)
    assert toy.main(["--quick"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results in "))
    assert folder != RESULTS
    assert json.loads((folder / "toy-small.json").read_text())["budget"] == "quick=True"


def test_a_variant_without_its_data_is_skipped_and_says_why(tmp_path, capsys):
    def absent(variant, args, results):
        if variant == "gone":
            raise SourceUnavailable("/nowhere/mnist not found")
        _measured(variant, args, results)

    toy = Benchmark("toy", "A toy.", ["gone", "here"], absent)
    assert toy.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gone skipped: /nowhere/mnist not found" in out
    assert not (tmp_path / "toy-gone.json").exists() and (tmp_path / "toy-here.json").exists()
    assert toy.main(["--out", str(tmp_path), "--variant", "gone"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("skipped: no variant's data")

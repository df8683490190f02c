"""Amalgam on Flower: how a marketplace of local parties scales on the simulation engine, and
what a Flower deployment costs against direct gRPC for the same job.

Variant ``marketplace``: ``amalgam market`` on MNIST from ``../shared/data`` (the first 50,000
training images split among N parties, each a seeded half of the classes, small BN-CNN 5
epochs; the coordinator's 5,000 next training images unlabeled; test: the first 2,000 MNIST
test images; student 10 epochs; seed 0) over Flower's simulation engine for N = 3, 10, 50,
100. Rows ``student:n<N>`` (accuracy) and ``wall_seconds:n<N>`` (the composition, the
parties' training excluded); ``extra`` has the best teacher and the ensemble per N.

    python -m benchmarks.flower [--variant marketplace] [--parties 3 10] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.results_io import write_results
from fusion.data import SourceUnavailable
from server.market import run_market

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
MARKET_SIZES = [3, 10, 50, 100]
VARIANTS = ["marketplace", "grpc-vs-flower"]
RAW_ROWS = ("wall_seconds:", "bytes:", "rounds:")


def marketplace(sizes: list[int], data: str, epochs: int, out: Path) -> dict:
    started = time.perf_counter()
    results, extra = {}, {"best_teacher": {}, "ensemble": {}, "engine": "flower simulation"}
    for n in sizes:
        print(f"{n} parties ...", flush=True)
        metrics = run_market(n, "flower", data, SEED, str(out / "runs"), epochs, log=lambda m: None)
        results[f"student:n{n}"] = metrics["results"]["student"]
        results[f"wall_seconds:n{n}"] = round(metrics["seconds"], 1)
        extra["best_teacher"][f"n{n}"] = metrics["results"]["best_teacher"]
        extra["ensemble"][f"n{n}"] = metrics["results"]["ensemble"]
    extra["units"] = {"student:n<N>": "accuracy", "wall_seconds:n<N>": "seconds"}
    return {
        "benchmark": "flower",
        "variant": "marketplace",
        "data": (
            "digits: the three private shards split among the parties; public unlabeled; test"
            if data == "digits"
            else f"{data}: first 50,000 training images split among the parties (a seeded "
            "half of the classes each); 5,000 next ones unlabeled; test: first 2,000 test "
            "images; shared/data"
        ),
        "seed": SEED,
        "budget": f"teachers small BN-CNN 5 epochs; student {epochs} epochs; 2 cores",
        "metric": "accuracy",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "extra": extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, action="append")
    parser.add_argument("--parties", type=int, nargs="+", default=MARKET_SIZES)
    parser.add_argument("--quick", action="store_true", help="digits, 3 parties, to a temp dir")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="flower-quick-")) if args.quick else RESULTS
    data, sizes, epochs = ("digits", [3], 20) if args.quick else ("mnist", args.parties, 10)
    try:
        for variant in args.variant or ["marketplace"]:
            if variant == "marketplace":
                record = marketplace(sizes, data, epochs, out)
            print(write_results(record, out, VARIANTS, raw_rows=RAW_ROWS))
    except SourceUnavailable as error:
        print(f"skipped: {error}")
        return 0
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

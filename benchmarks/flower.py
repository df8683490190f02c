"""Amalgam on Flower: how a marketplace of local parties scales on the simulation engine, and
what a Flower deployment costs against direct gRPC for the same job.

Variant ``marketplace``: ``amalgam market`` on MNIST from ``../shared/data`` (the first 50,000
training images split among N parties, each a seeded half of the classes, small BN-CNN 5
epochs and at least 200 steps; the coordinator's 5,000 next training images unlabeled; test:
the first 2,000 MNIST test images; student 10 epochs; seed 0) over Flower's simulation
engine for N = 3, 10, 50, 100; variant ``marketplace-grpc``: the same over direct gRPC for
N = 100, 300, 1,000. Every agent runs in the benchmark's process (a thousand agent processes
do not fit a 24 GiB machine); teachers are kept in ``--teachers`` between runs. Rows
``student:n<N>`` (accuracy), ``wall_seconds:n<N>`` (the composition, the parties' training
excluded), ``peak_rss_mb:n<N>`` and ``threads:n<N>`` (the process, sampled every 0.25 s);
``extra`` has the best teacher, the ensemble, the pseudo-label retention and the parties
that answered per N.

Variant ``grpc-vs-flower``: the same composition job of 3 such parties (agents on loopback
over mutual TLS) run by the coordinator over direct gRPC, and submitted with ``flwr run`` to a
Flower deployment on loopback (:class:`~amalgam.server.simulation.loopback.LoopbackFederation`:
SuperLink with TLS and SuperNode authentication, a SuperNode bridging to each agent). Rows
``student:<engine>``, ``wall_seconds:<engine>`` (the job as the coordinator timed it;
``extra.flower_submit_to_end_s`` adds Flower's start of the run), ``bytes:<engine>`` (request
and reply bytes of the party calls, all parties), ``rounds:<engine>`` (calls per party, each
checked, charged and audited by its agent) and ``messages:<engine>`` (the transport messages
that carried them: over Flower, one carries every prediction chunk of a data set that fits
the 64 MiB limit).

    python -m benchmarks.flower [--variant marketplace-grpc] [--parties 300 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.loopback import LoopbackFederation
from amalgam.server.simulation.market import (
    market_data,
    market_job,
    market_min_parties,
    market_parties,
    run_market,
    start_agents,
)
from benchmarks.harness import Benchmark, Results, record

SEED = 0
MARKET_SIZES = {"marketplace": [3, 10, 50, 100], "marketplace-grpc": [100, 300, 1000]}
ENGINE = {"marketplace": "flower", "marketplace-grpc": "grpc"}
VARIANTS = ["marketplace", "marketplace-grpc", "grpc-vs-flower"]
RAW_ROWS = ("wall_seconds:", "bytes:", "rounds:", "messages:", "peak_rss_mb:", "threads:")
TEACHERS = Path.home() / ".cache" / "amalgam" / "market-teachers"
SAMPLE_S = 0.25


class Peaks:
    """The largest resident memory (MB) and thread count of this process, sampled every
    :data:`SAMPLE_S` while the block runs (the market's agents run in this process too)."""

    def __enter__(self) -> Peaks:
        self.rss_mb, self.threads = 0.0, 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.rss_mb = max(self.rss_mb, process.memory_info().rss / 2**20)
            self.threads = max(self.threads, process.num_threads())
            if self._stop.wait(SAMPLE_S):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()


def earlier_sizes(path: Path, sizes: list[int]) -> tuple[dict, dict]:
    """The rows and per-size extras of the other sizes in the variant's earlier results at
    ``path`` (none where it is absent): a run of one more size adds its column to them."""
    if not path.exists():
        return {}, {}
    earlier = json.loads(path.read_text())
    ours = {f"n{n}" for n in sizes}
    results = {k: v for k, v in earlier["results"].items() if k.split(":")[-1] not in ours}
    extra = {
        key: {size: v for size, v in value.items() if size not in ours}
        for key, value in earlier["extra"].items()
        if isinstance(value, dict) and key != "units"
    }
    return results, extra


def marketplace(
    variant: str, sizes: list[int], data: str, epochs: int, teachers: Path, earlier: Path
) -> dict:
    """``sizes`` over the variant's engine, added to the other sizes in ``earlier``."""
    started = time.perf_counter()
    engine = ENGINE[variant]
    results, extra = earlier_sizes(earlier, sizes)
    for key in ("best_teacher", "ensemble", "min_parties", "retention", "parties_answered"):
        extra.setdefault(key, {})
    extra["engine"] = "flower simulation" if engine == "flower" else "direct gRPC"
    for n in sizes:
        print(f"{n} parties ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="flower-market-") as runs, Peaks() as peaks:
            metrics = run_market(n, engine, data, SEED, runs, epochs, log=print,
                                 pretrained=teachers)  # fmt: skip
        results[f"student:n{n}"] = metrics["results"]["student"]
        extra["retention"][f"n{n}"] = metrics["extra"]["retention"]
        results[f"wall_seconds:n{n}"] = round(metrics["seconds"], 1)
        results[f"peak_rss_mb:n{n}"] = round(peaks.rss_mb)
        results[f"threads:n{n}"] = peaks.threads
        extra["best_teacher"][f"n{n}"] = metrics["results"]["best_teacher"]
        extra["ensemble"][f"n{n}"] = metrics["results"]["ensemble"]
        extra["min_parties"][f"n{n}"] = market_min_parties(n)
        extra["parties_answered"][f"n{n}"] = sum(
            k.startswith("teacher:") for k in metrics["results"]
        )
    extra["units"] = {
        "student:n<N>": "accuracy",
        "wall_seconds:n<N>": "seconds of the composition (teachers cached or trained before)",
        "peak_rss_mb:n<N>": "MB, the whole process: coordinator and every agent",
        "threads:n<N>": "the process's largest thread count",
    }
    return record(
        "flower",
        variant,
        data=(
            "digits: the three private shards split among the parties; public unlabeled; test"
            if data == "digits"
            else f"{data}: first 50,000 training images split among the parties (a seeded "
            "half of the classes each); 5,000 next ones unlabeled; test: first 2,000 test "
            "images; shared/data"
        ),
        seed=SEED,
        budget=f"teachers small BN-CNN 5 epochs, at least 200 steps; student {epochs} "
        "epochs; 2 cores",
        results=results,
        started=started,
        extra=extra,
    )


def grpc_vs_flower(data: str, epochs: int) -> dict:
    started = time.perf_counter()
    market = market_data(data)
    parties = market_parties(3, market, SEED)
    names = [p[0] for p in parties]
    results, extra = {}, {"units": {"wall_seconds": "s", "bytes": "bytes", "rounds": "calls",
                                     "messages": "messages"}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="grpc-vs-flower-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        federation = LoopbackFederation(folder)
        federation.certificates(names, ["coordinator"])
        addresses = start_agents(parties, market, SEED, folder, stack, federation.certs)
        student = {"arch": "small_cnn", "epochs": epochs, "batch_size": 64}
        certs = federation.certs
        tls = {"cert": str(certs / "coordinator.pem"), "key": str(certs / "coordinator.key"),
               "ca": str(certs / "ca.pem")}  # fmt: skip
        runs = {}
        spec = load_job(
            market_job(parties, addresses, market, folder, "grpc", seed=SEED, student=student,
                       output_dir=str(folder / "grpc"), tls=tls)
        )  # fmt: skip
        runs["grpc"] = run_job(spec, connect(spec, log=lambda m: None), progress=False,
                               log=lambda m: None)  # fmt: skip
        flower_job = market_job(parties, addresses, market, folder, "flower", seed=SEED,
                                student=student, output_dir=str(folder / "flower"))  # fmt: skip
        stack.enter_context(federation)
        federation.start_superlink()
        for name, address in zip(names, addresses):
            federation.register(f"{name}-node")
            federation.start_supernode(f"{name}-node", address)
        federation.wait_online(len(names))
        submitted = time.perf_counter()
        status = federation.run(flower_job)
        extra["flower_submit_to_end_s"] = round(time.perf_counter() - submitted, 1)
        extra["flower_status"] = status
        if not status["status"].startswith("finished:completed"):
            raise RuntimeError(f"the Flower run ended {status['status']}")
        (runs["flower"],) = (folder / "flower").glob("flower-*")
        for engine, run_dir in runs.items():
            metrics = json.loads((run_dir / "metrics.json").read_text())
            stats = metrics["parties"].values()
            results[f"student:{engine}"] = metrics["results"]["student"]
            results[f"wall_seconds:{engine}"] = round(metrics["wall_seconds"], 1)
            results[f"bytes:{engine}"] = sum(p["bytes_sent"] + p["bytes_received"] for p in stats)
            results[f"rounds:{engine}"] = max(p["calls"] for p in stats)
            results[f"messages:{engine}"] = max(p["messages"] for p in stats)
    return record(
        "flower",
        "grpc-vs-flower",
        data=f"{data}: 3 parties as in the marketplace variant; 5,000 unlabeled; test 2,000",
        seed=SEED,
        budget=f"student {epochs} epochs; loopback, 2 cores",
        results=results,
        started=started,
        extra=extra,
    )


def run_variant(variant: str, args: argparse.Namespace, results: Results) -> None:
    """``--quick``: digits, 3 parties; else MNIST and ``--parties`` (default: the variant's
    :data:`MARKET_SIZES`)."""
    if variant == "grpc-vs-flower":
        results.write(grpc_vs_flower(*(("digits", 20) if args.quick else ("mnist", 10))))
        return
    sizes = args.parties or MARKET_SIZES[variant]
    data, sizes, epochs = ("digits", [3], 20) if args.quick else ("mnist", sizes, 10)
    earlier = results.folder / f"flower-{variant}.json"
    results.write(marketplace(variant, sizes, data, epochs, Path(args.teachers), earlier))


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parties", type=int, nargs="+")
    parser.add_argument("--teachers", default=str(TEACHERS),
                        help="where the parties' teachers are kept between runs")  # fmt: skip


BENCHMARK = Benchmark(
    "flower",
    __doc__,
    VARIANTS,
    run_variant,
    options=options,
    results={"raw_rows": RAW_ROWS, "figure": False},  # students over two engines, times
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())

"""Cost of the party protocol on loopback: gRPC versus in-process, and parallel fan-out.

Variant ``loopback``: the demo CNN at 8x8 and, in rows ending ``:vgg_cnn``, the compute-heavy
``vgg_cnn`` at 32x32 (random weights) behind a :class:`amalgam.party.handler.PartyHandler`,

- throughput in images/s at batch 256 of :class:`amalgam.party.local.LocalTeacher` and of
  :class:`amalgam.server.remote.RemoteTeacher` against a real server on ``127.0.0.1``, every
  call on a new batch (a repeated one would be answered from the agent's replay cache);
- the protocol's own cost: remote minus in-process in a worker thread (where the agent runs
  the model), against a bare gRPC unary call of the same request and response sizes;
- cache-sized slices: images/s of an in-process Predict at batch 1,024 with the model run in
  the slices that :func:`amalgam.party.slicing.slice_size` chooses against in one pass, for the
  small BN-CNN at 28x28, ``vgg_cnn`` and ``resnet20_cifar`` at 32x32 (rows
  ``sliced_over_whole:<model>``);
- fan-out efficiency: eight servers whose handlers sleep 50 ms before answering (simulated
  network latency), called at once through :func:`amalgam.server.fanout.fan_out`; efficiency
  is the sum of the parties' own call times over the wall time, divided by the number of parties
  (1 = perfectly parallel, 1/8 = serial).

Run ``python -m benchmarks.protocol`` from the repository root; ``--quick`` is a smoke run that
writes its results to a temporary folder, never to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import torch
from torch import Tensor

from amalgam.fusion.models import create_model
from amalgam.party.allocator import keep_freed_memory
from amalgam.party.config import PartyConfig
from amalgam.party.handler import PartyHandler
from amalgam.party.local import LocalTeacher
from amalgam.party.slicing import SLICE_BYTES, slice_size
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.fanout import fan_out
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.demo_parties import DEMO_ARCH
from amalgam.server.simulation.parties import local_party, serving
from benchmarks.harness import Benchmark, Results, record

NAME = "protocol"
VARIANT = "loopback"
SEED = 0
NUM_CLASSES = 10
BATCH = 256
SLICE_BATCH = 1024  # where slicing applies to every model of SLICED_MODELS
FANOUT_PARTIES = 8
FANOUT_BATCH = 32
LATENCY_S = 0.05
KEEP_FREED_MB = PartyConfig.model_fields["keep_freed_mb"].default


MODELS = {  # row suffix -> (registered architecture, its keywords)
    "": (DEMO_ARCH["name"], DEMO_ARCH["kwargs"]),
    ":vgg_cnn": ("vgg_cnn", {"in_shape": (3, 32, 32)}),  # compute-heavy: 32x32 colour images
}


def build_handler(
    name: str, audit_dir: Path, latency_s: float = 0.0, arch: tuple[str, dict] = MODELS[""],
    slice_bytes: int = SLICE_BYTES, max_batch: int = BATCH,
) -> PartyHandler:  # fmt: skip
    """``arch`` (the demo CNN by default), randomly initialised, behind a party that releases
    probabilities on up to ``max_batch`` images a call, after sleeping ``latency_s`` in every
    Predict (simulated network latency); its forward passes in slices of ``slice_bytes``."""
    model = create_model(arch[0], **arch[1], num_classes=NUM_CLASSES)
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=max_batch,
                    sample_budget=None)  # fmt: skip
    classes = [str(k) for k in range(NUM_CLASSES)]
    handler = local_party(name, model.eval(), classes, tuple(arch[1]["in_shape"]), policy,
                          audit_dir, slice_bytes=slice_bytes)  # fmt: skip
    if latency_s:
        answer = handler.predict

        def delayed(x: Tensor, caller: str, request_id: str = "") -> Tensor:
            time.sleep(latency_s)
            return answer(x, caller, request_id)

        handler.predict = delayed
    return handler


@contextmanager
def served(handler: PartyHandler) -> Iterator[RemoteTeacher]:
    """Serve ``handler`` on ``127.0.0.1`` (free port) and yield a client; stop both on exit."""
    with serving(handler) as address, RemoteTeacher(handler.name, address) as teacher:
        yield teacher


def interleaved_medians(
    calls: dict[str, Callable[[Tensor], object]], batches: Iterator[Tensor], warmup: int,
    repeats: int,
) -> dict[str, float]:  # fmt: skip
    """Median wall seconds of each of ``calls`` over ``repeats`` rounds, after ``warmup``
    untimed ones. A round calls each once, in turn, so that every call meets the machine in
    the same state; each on the next of ``batches``: a party answers a request it has answered
    before from its replay cache, so the same batch twice would time the cache."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, fn in calls.items():
            x = next(batches)
            started = time.perf_counter()
            fn(x)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def fresh_batches(shape: tuple[int, ...], batch: int = BATCH) -> Iterator[Tensor]:
    """Endless distinct random (batch, *shape) batches."""
    while True:
        yield torch.rand(batch, *shape)


@contextmanager
def echo(response_bytes: int) -> Iterator[Callable[[bytes], bytes]]:
    """A bare gRPC unary method on ``127.0.0.1`` that answers any request with
    ``response_bytes`` bytes: the floor of one call of those sizes, without the protocol."""
    answer = bytes(response_bytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    methods = {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: answer)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel.unary_unary("/echo.Echo/Call")
    finally:
        server.stop(None)


def message_bytes(remote: RemoteTeacher, x: Tensor) -> tuple[int, int]:
    """Request and response bytes of one ``remote.predict(x)`` (``x`` fits in one call)."""
    before = dataclasses.replace(remote.stats)
    remote.predict(x)
    after = remote.stats
    return after.bytes_sent - before.bytes_sent, after.bytes_received - before.bytes_received


def bench_throughput(audit_dir: Path, repeats: int, suffix: str = "") -> tuple[dict, dict]:
    """Images/s at batch ``BATCH`` of ``MODELS[suffix]``, in process and through gRPC, and
    the protocol's own cost against the floor of a bare gRPC call of the same sizes.

    The agent runs the model in a gRPC worker thread, so the in-process time that the remote
    one is compared with is measured in a worker thread too (``local_worker``); the caller's
    own thread (``local``) is shown beside it. All four are timed in turn, round after round
    (:func:`interleaved_medians`), each call on a batch not seen before.

    Returns
    -------
    results : dict
        Rows, each ending in ``suffix``: ``local_img_per_s``, ``remote_img_per_s``,
        ``remote_over_local`` (against the worker thread), ``bare_grpc_ms``,
        ``remote_overhead_ms`` (remote minus local in a worker thread) and
        ``overhead_over_floor`` (that overhead over ``bare_grpc_ms``).
    extra : dict
        Median milliseconds per call and the Predict message sizes in bytes.
    """
    handler = build_handler(f"throughput{suffix.replace(':', '-')}", audit_dir,
                            arch=MODELS[suffix])  # fmt: skip
    batches = fresh_batches(handler.input_shape)
    local = LocalTeacher(handler)
    with ExitStack() as stack:
        worker = stack.enter_context(futures.ThreadPoolExecutor(max_workers=1))
        remote = stack.enter_context(served(handler))
        sent, received = message_bytes(remote, next(batches))
        call = stack.enter_context(echo(received))
        request = bytes(sent)
        seconds = interleaved_medians(
            {
                "local": local.predict,
                "local_worker": lambda x: worker.submit(local.predict, x).result(),
                "remote": remote.predict,
                "bare": lambda x: call(request),
            },
            batches,
            warmup=5,
            repeats=repeats,
        )
    overhead_s = seconds["remote"] - seconds["local_worker"]
    results = {
        "local_img_per_s": BATCH / seconds["local"],
        "remote_img_per_s": BATCH / seconds["remote"],
        "remote_over_local": seconds["local_worker"] / seconds["remote"],
        "bare_grpc_ms": 1000 * seconds["bare"],
        "remote_overhead_ms": 1000 * overhead_s,
        "overhead_over_floor": overhead_s / seconds["bare"],
    }
    extra = {
        "batch": BATCH,
        "local_ms_per_call": 1000 * seconds["local"],
        "local_worker_ms_per_call": 1000 * seconds["local_worker"],
        "remote_ms_per_call": 1000 * seconds["remote"],
        "request_bytes": sent,
        "response_bytes": received,
    }
    return ({row + suffix: value for row, value in results.items()},
            {key + suffix: value for key, value in extra.items()})  # fmt: skip


SLICED_MODELS = {  # row suffix -> (registered architecture, its keywords)
    "small_cnn": ("small_cnn", {"in_shape": (1, 28, 28), "width": 16}),  # the market's parties
    "vgg_cnn": ("vgg_cnn", {"in_shape": (3, 32, 32)}),
    "resnet20_cifar": ("resnet20_cifar", {"in_shape": (3, 32, 32)}),
}


def bench_slicing(audit_dir: Path, repeats: int) -> tuple[dict, dict]:
    """A party's Predict at batch ``SLICE_BATCH`` in process, its model run in cache-sized
    slices (:mod:`amalgam.party.slicing`, the default) against whole (``slice_bytes=0``), for
    each of ``SLICED_MODELS``; the two parties hold the same weights and are called in turn,
    round after round.

    Returns
    -------
    results : dict
        Rows ``sliced_over_whole:<model>``: sliced images/s over whole-batch images/s.
    extra : dict
        Each model's slice and both speeds in images/s.
    """
    results, extra = {}, {}
    for row, arch in SLICED_MODELS.items():
        torch.manual_seed(SEED)
        sliced = build_handler(f"sliced-{row}", audit_dir, arch=arch, max_batch=SLICE_BATCH)
        torch.manual_seed(SEED)
        whole = build_handler(f"whole-{row}", audit_dir, arch=arch, slice_bytes=0,
                              max_batch=SLICE_BATCH)  # fmt: skip
        batches = fresh_batches(sliced.input_shape, SLICE_BATCH)
        seconds = interleaved_medians(
            {"whole": LocalTeacher(whole).predict, "sliced": LocalTeacher(sliced).predict},
            batches, warmup=3, repeats=repeats,
        )  # fmt: skip
        results[f"sliced_over_whole:{row}"] = seconds["whole"] / seconds["sliced"]
        extra |= {
            f"slice:{row}": slice_size(sliced.model, next(batches)),
            f"whole_img_per_s:{row}": SLICE_BATCH / seconds["whole"],
            f"sliced_img_per_s:{row}": SLICE_BATCH / seconds["sliced"],
        }
    return results, extra


def timed_predict(teacher: RemoteTeacher, x: Tensor) -> float:
    """Seconds that one ``teacher.predict(x)`` takes, as seen by its own caller thread."""
    started = time.perf_counter()
    teacher.predict(x)
    return time.perf_counter() - started


def fanout_round(teachers: list[RemoteTeacher], x: Tensor) -> tuple[float, list[float]]:
    """Wall seconds of one parallel call of every teacher, and each party's own call time."""
    started = time.perf_counter()
    party_s = fan_out(lambda teacher: timed_predict(teacher, x), teachers)
    return time.perf_counter() - started, party_s


def bench_fanout(audit_dir: Path, repeats: int) -> tuple[dict, dict]:
    """Fan-out efficiency over ``FANOUT_PARTIES`` servers that each add ``LATENCY_S``.

    Returns
    -------
    results : dict
        Row ``fanout_efficiency``: the median over rounds of
        ``sum(party call times) / wall time / FANOUT_PARTIES``.
    extra : dict
        Median wall and per-party milliseconds, and the set-up.
    """
    shape = DEMO_ARCH["kwargs"]["in_shape"]
    with ExitStack() as stack:
        teachers = [
            stack.enter_context(served(build_handler(f"party-{i}", audit_dir, LATENCY_S)))
            for i in range(FANOUT_PARTIES)
        ]
        # warm-up: connects every channel and fetches Describe; then a new batch each round,
        # which the parties have not answered before (no replay from their caches)
        fanout_round(teachers, torch.rand(FANOUT_BATCH, *shape))
        rounds = [fanout_round(teachers, torch.rand(FANOUT_BATCH, *shape)) for _ in range(repeats)]
    efficiency = [sum(party_s) / wall / FANOUT_PARTIES for wall, party_s in rounds]
    results = {"fanout_efficiency": statistics.median(efficiency)}
    extra = {
        "fanout_parties": FANOUT_PARTIES,
        "fanout_batch": FANOUT_BATCH,
        "fanout_injected_latency_ms": 1000 * LATENCY_S,
        "fanout_wall_ms": 1000 * statistics.median(wall for wall, _ in rounds),
        "fanout_party_ms": 1000 * statistics.median(s for _, party_s in rounds for s in party_s),
        "fanout_serial_ms": 1000 * statistics.median(sum(party_s) for _, party_s in rounds),
    }
    return results, extra


def markdown(payload: dict) -> str:
    """The results as a markdown table, headed by the run's set-up."""
    lines = [
        f"# {payload['benchmark']} ({payload['variant']})",
        "",
        f"Data: {payload['data']}. Budget: {payload['budget']}. Seed {payload['seed']}; "
        f"wall time {payload['wall_seconds']:.1f} s. Command: `python -m benchmarks.{NAME}`.",
        "",
        f"| row | {payload['metric']} |",
        "|---|---:|",
        *(f"| {row} | {value:,.3f} |" for row, value in payload["results"].items()),
        "",
        "| extra | value |",
        "|---|---:|",
        *(
            f"| {key} | {value:,.3f} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in payload["extra"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def run_variant(variant: str, args: argparse.Namespace, results: Results) -> None:
    """Both measurements, seeded, with their audit logs in a temporary folder."""
    repeats, fanout_repeats = (3, 2) if args.quick else (30, 10)
    kept = keep_freed_memory(KEEP_FREED_MB)  # as `amalgam party serve` does, for both sides
    torch.manual_seed(SEED)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amalgam-bench-audit-") as audit_dir:
        rows, extra = {}, {}
        for suffix in MODELS:
            model_rows, model_extra = bench_throughput(Path(audit_dir), repeats, suffix)
            rows, extra = rows | model_rows, extra | model_extra
        fanout_rows, fanout_extra = bench_fanout(Path(audit_dir), fanout_repeats)
        slicing_rows, slicing_extra = bench_slicing(Path(audit_dir), repeats)
    results.write(
        record(
            NAME,
            variant,
            data="synthetic inputs; the demo CNN at 8x8, vgg_cnn at 32x32 (rows :vgg_cnn); "
            "slicing: small_cnn at 28x28, vgg_cnn and resnet20_cifar at 32x32",
            seed=SEED,
            budget=f"{repeats} timed calls (median) at batch {BATCH} (slicing: {SLICE_BATCH}); "
            f"{fanout_repeats} fan-out "
            f"rounds (median) over {FANOUT_PARTIES} parties at batch {FANOUT_BATCH}",
            results={**rows, **slicing_rows, **fanout_rows},
            started=started,
            extra={
                **extra,
                **slicing_extra,
                **fanout_extra,
                "repeats": repeats,
                "fanout_repeats": fanout_repeats,
                "torch_threads": torch.get_num_threads(),
                "keep_freed_mb": KEEP_FREED_MB if kept else 0,
                "torch": torch.__version__,
            },
            metric="images/s and ratios",
        )
    )


BENCHMARK = Benchmark(
    NAME,
    __doc__,
    [VARIANT],
    run_variant,
    results={"markdown": lambda records: markdown(records[0]), "figure": False},
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())

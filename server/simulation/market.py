"""``amalgam market``: a simulated marketplace of N local parties, composed into one student
over direct gRPC or over Flower's simulation engine.

Each party holds a disjoint shard of a real data set (scikit-learn's digits by default; MNIST
or Fashion-MNIST from ``../shared/data``), restricted to a seeded random half of the classes,
trains a small CNN on it and serves it from its own agent on loopback; the coordinator
composes every party on the set's unlabeled pool and scores the student on its test split.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import yaml

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.protocol.schemas import Policy, PredictPolicy, TlsFiles
from amalgam.protocol.tls import server_credentials
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.parties import local_party, serving

ENGINES = ("grpc", "flower")


@dataclasses.dataclass(frozen=True)
class MarketData:
    pool: Dataset  # split among the parties
    unlabeled: Dataset  # the coordinator's
    test: Dataset
    teacher_epochs: int
    width: int  # channels of the parties' small CNNs


def market_data(name: str, unlabeled: int = 5000, test: int = 2000) -> MarketData:
    """``digits`` (embedded), or ``mnist`` / ``fashion_mnist``: their first 50,000 training
    images are the parties', the next ``unlabeled`` the coordinator's, and the first ``test``
    test images the test split."""
    if name == "digits":
        shards = [load_source(f"digits:private-{k}") for k in range(3)]
        pool = Dataset(
            torch.cat([s.x for s in shards]),
            torch.cat([s.y for s in shards]),
            shards[0].class_names,
        )
        return MarketData(pool, load_source("digits:public"), load_source("digits:test"), 40, 16)
    train, test_set = load_source(f"{name}:train"), load_source(f"{name}:test")
    return MarketData(
        train.subset(np.arange(50_000)),
        train.subset(np.arange(50_000, 50_000 + unlabeled)),
        test_set.subset(np.arange(test)),
        5,
        16,
    )


def market_parties(n: int, data: MarketData, seed: int = 0) -> list[tuple[str, list[str], Dataset]]:
    """``(name, classes, shard)`` of each party: a seeded half of the classes (at least two)
    and the images of those classes in its disjoint share of the pool."""
    rng = np.random.default_rng(seed)
    shares = np.array_split(rng.permutation(len(data.pool)), n)
    names = data.pool.class_names
    parties = []
    for k, share in enumerate(shares):
        classes = sorted(rng.choice(names, size=max(2, len(names) // 2), replace=False).tolist())
        parties.append((f"org{k:03d}", classes, data.pool.subset(np.sort(share)).restrict(classes)))
    return parties


MIN_TEACHER_STEPS = 200  # however small its shard, a party trains its teacher this long
TEACHER_BATCH = 32


def train_party(classes: list[str], shard: Dataset, data: MarketData, seed: int):
    """The party's small CNN: ``data.teacher_epochs`` epochs, more where the shard is so small
    that they would be fewer than ``MIN_TEACHER_STEPS`` optimiser steps."""
    torch.manual_seed(seed)
    shape = tuple(shard.x.shape[1:])
    model = create_model("small_cnn", in_shape=shape, num_classes=len(classes), width=data.width)
    steps_per_epoch = -(-len(shard) // TEACHER_BATCH)
    epochs = max(data.teacher_epochs, -(-MIN_TEACHER_STEPS // steps_per_epoch))
    fit(model, shard.x, shard.y, epochs=epochs, batch_size=TEACHER_BATCH, seed=seed,
        progress=False)  # fmt: skip
    return model.eval()


def start_agents(
    parties, data: MarketData, seed: int, folder: Path, stack: ExitStack, certs: Path | None = None
) -> list[str]:
    """Train each party's teacher and serve it from its own agent on loopback (stopped with
    ``stack``); with ``certs`` (see :class:`.loopback.LoopbackFederation`) over mutual TLS,
    admitting the coordinator and the party's SuperNode bridge. Returns the addresses."""
    addresses = []
    for k, (name, classes, shard) in enumerate(parties):
        model = train_party(classes, shard, data, seed + k)
        callers = None
        credentials = None
        if certs is not None:
            callers = {"coordinator": ["predict"], f"{name}-node": ["predict"]}
            tls = TlsFiles(cert=str(certs / f"{name}.pem"), key=str(certs / f"{name}.key"),
                           ca=str(certs / "ca.pem"))  # fmt: skip
            credentials = server_credentials(tls)
        policy = Policy(
            predict=PredictPolicy(output="probs"), max_batch=256, sample_budget=None,
            callers=callers,
        )  # fmt: skip
        handler = local_party(name, model, classes, tuple(shard.x.shape[1:]), policy, folder)
        addresses.append(stack.enter_context(serving(handler, credentials, max_workers=2)))
    return addresses


def market_job(
    parties, addresses: list[str], data: MarketData, folder: Path, name: str, **fields
) -> Path:
    """The composition job over every party, its data written beside it; returns its path."""
    for part, dataset in {"unlabeled": data.unlabeled, "test": data.test}.items():
        np.savez(folder / f"{part}.npz", x=dataset.x.numpy(), y=dataset.y.numpy(),
                 class_names=np.array(dataset.class_names))  # fmt: skip
    job = {
        "name": name,
        "parties": [{"name": p[0], "address": a} for p, a in zip(parties, addresses)],
        "method": {"name": "composition"},
        "data": {"unlabeled": str(folder / "unlabeled.npz"), "test": str(folder / "test.npz")},
        "baselines": False,
        **fields,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_market(
    n: int,
    engine: str = "grpc",
    data_name: str = "digits",
    seed: int = 0,
    output_dir: str = "runs",
    student_epochs: int = 20,
    log=print,
) -> dict:
    """Train and serve ``n`` parties, compose them with ``engine``; returns the job's metrics
    plus ``seconds`` (the composition, the parties' training excluded)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    data = market_data(data_name)
    parties = market_parties(n, data, seed)
    log(f"training {n} parties' teachers on {data_name} shards")
    with tempfile.TemporaryDirectory(prefix="amalgam-market-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        addresses = start_agents(parties, data, seed, folder, stack)
        student = {"arch": "small_cnn", "epochs": student_epochs, "batch_size": 64}
        spec = load_job(market_job(parties, addresses, data, folder, f"market-{n}-{engine}",
                                   seed=seed, student=student, output_dir=output_dir))  # fmt: skip
        log(f"composing {n} parties over {engine}")
        started = time.perf_counter()
        if engine == "grpc":
            run_dir = run_job(spec, connect(spec, log=log), progress=False, log=log)
        else:
            from amalgam.server.simulation.flower import simulate

            run_dir, _ = simulate(spec, addresses)
        seconds = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics | {"seconds": seconds, "run_dir": str(run_dir)}

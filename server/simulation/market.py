"""``amalgam market``: a simulated marketplace of N local parties, composed into one student
over direct gRPC or over Flower's simulation engine.

Each party holds a disjoint shard of a real data set (scikit-learn's digits by default; MNIST
or Fashion-MNIST from ``../shared/data``), restricted to a seeded random half of the classes,
trains a small CNN on it (or takes the one an earlier run kept, ``--pretrained DIR``) and
serves it from its own agent on loopback, all in this process; the coordinator composes every
party on the set's unlabeled pool, going on while half of them answer, and scores the student
on its test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

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
    name: str
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
        public, test_set = load_source("digits:public"), load_source("digits:test")
        return MarketData(name, pool, public, test_set, 40, 16)
    train, test_set = load_source(f"{name}:train"), load_source(f"{name}:test")
    return MarketData(
        name,
        train.subset(np.arange(50_000)),
        train.subset(np.arange(50_000, 50_000 + unlabeled)),
        test_set.subset(np.arange(test)),
        5,
        16,
    )


MIN_SHARD_IMAGES = 10  # the fewest images of its classes a party trains its teacher on


def supported_parties(data: MarketData) -> int:
    """About how many parties ``data`` can give :data:`MIN_SHARD_IMAGES` images each of half
    the classes: a share of the pool holds about half its images in those classes, and the
    smallest of many shares falls well below the mean."""
    return len(data.pool) // (4 * MIN_SHARD_IMAGES)


def market_parties(n: int, data: MarketData, seed: int = 0) -> list[tuple[str, list[str], Dataset]]:
    """``(name, classes, shard)`` of each party: a seeded half of the classes (at least two)
    and the images of those classes in its disjoint share of the pool. A share with fewer
    than :data:`MIN_SHARD_IMAGES` such images raises ``ValueError`` saying how many parties
    the data set supports."""
    if n < 1:
        raise ValueError(f"parties: {n}; a market needs at least one party")
    rng = np.random.default_rng(seed)
    shares = np.array_split(rng.permutation(len(data.pool)), n)
    names = data.pool.class_names
    parties = []
    for k, share in enumerate(shares):
        classes = sorted(rng.choice(names, size=max(2, len(names) // 2), replace=False).tolist())
        shard = data.pool.subset(np.sort(share)).restrict(classes)
        if len(shard) < MIN_SHARD_IMAGES:
            raise ValueError(
                f"parties: {n} parties leave org{k:03d} {len(shard)} images of its classes "
                f"(it needs {MIN_SHARD_IMAGES}); {data.name} supports about "
                f"{supported_parties(data)} parties (mnist and fashion_mnist about 1,250)"
            )
        parties.append((f"org{k:03d}", classes, shard))
    return parties


def market_min_parties(n: int) -> int:
    """A market goes on while half its parties (rounded up) answer: one of many sellers that
    is slow or gone does not stop the job, as it would a federation of a few named ones."""
    return -(-n // 2)


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


def teacher_fingerprint(classes: list[str], shard: Dataset, data: MarketData, seed: int) -> str:
    """What a party's teacher is made of: its images, labels and classes, the training
    budget, the architecture and the seed (a cached teacher is used only when all match)."""
    digest = hashlib.sha256(json.dumps([classes, data.teacher_epochs, data.width, seed,
                                        MIN_TEACHER_STEPS, TEACHER_BATCH]).encode())  # fmt: skip
    digest.update(shard.x.numpy().tobytes())
    digest.update(shard.y.numpy().tobytes())
    return digest.hexdigest()[:16]


def party_teacher(
    name: str, classes: list[str], shard: Dataset, data: MarketData, seed: int,
    pretrained: Path | None = None,
) -> torch.nn.Module:  # fmt: skip
    """:func:`train_party`, or, with ``pretrained``, the teacher kept there by an earlier run
    for the same party (``<name>-<fingerprint>.safetensors``); one trained here is kept there
    for the next run."""
    if pretrained is None:
        return train_party(classes, shard, data, seed)
    path = pretrained / f"{name}-{teacher_fingerprint(classes, shard, data, seed)}.safetensors"
    if not path.exists():
        model = train_party(classes, shard, data, seed)
        pretrained.mkdir(parents=True, exist_ok=True)
        fresh = path.with_suffix(".tmp")
        save_file(model.state_dict(), str(fresh))
        fresh.replace(path)  # whole or not at all
        return model
    model = create_model("small_cnn", in_shape=tuple(shard.x.shape[1:]),
                         num_classes=len(classes), width=data.width)  # fmt: skip
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def start_agents(
    parties, data: MarketData, seed: int, folder: Path, stack: ExitStack, certs: Path | None = None,
    pretrained: Path | None = None, log=lambda message: None,
) -> list[str]:  # fmt: skip
    """Train each party's teacher (or take it from ``pretrained``, see :func:`party_teacher`)
    and serve it from its own agent on loopback (stopped with ``stack``); with ``certs`` (see
    :class:`.loopback.LoopbackFederation`) over mutual TLS, admitting the coordinator and the
    party's SuperNode bridge. Returns the addresses."""
    addresses = []
    every = max(1, len(parties) // 10)
    for k, (name, classes, shard) in enumerate(parties):
        model = party_teacher(name, classes, shard, data, seed + k, pretrained)
        if (k + 1) % every == 0 or k + 1 == len(parties):
            log(f"{k + 1} of {len(parties)} parties' teachers ready")
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
        # every agent in this one process: whole batches leave the interpreter's lock to the
        # model (amalgam.party.slicing)
        handler = local_party(name, model, classes, tuple(shard.x.shape[1:]), policy, folder,
                              slice_bytes=0)  # fmt: skip
        addresses.append(stack.enter_context(serving(handler, credentials, max_workers=1)))
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
    pretrained: str | Path | None = None,
) -> dict:
    """Train (or, with ``pretrained``, reuse) and serve ``n`` parties, compose them with
    ``engine`` while :func:`market_min_parties` answer; returns the job's metrics plus
    ``seconds`` (the composition, the parties' training excluded)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    data = market_data(data_name)
    parties = market_parties(n, data, seed)
    pretrained = None if pretrained is None else Path(pretrained)
    log(f"training {n} parties' teachers on {data_name} shards"
        + (f" (kept in {pretrained})" if pretrained else ""))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="amalgam-market-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        addresses = start_agents(parties, data, seed, folder, stack, pretrained=pretrained,
                                 log=log)  # fmt: skip
        student = {"arch": "small_cnn", "epochs": student_epochs, "batch_size": 64}
        spec = load_job(market_job(parties, addresses, data, folder, f"market-{n}-{engine}",
                                   seed=seed, student=student, output_dir=output_dir,
                                   min_parties=market_min_parties(n)))  # fmt: skip
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

"""The demo's three organizations: their private teachers, party configs and job, and the
files of the Flower deployment that ``deploy/compose.yaml`` runs (``amalgam demo --prepare``).

Three organizations each hold a private shard of scikit-learn's digits restricted to an
overlapping subset of classes. Their teachers are trained on first use and cached under
``$AMALGAM_CACHE`` (default ``~/.cache/amalgam``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from amalgam.fusion.data import DIGIT_NAMES, cache_dir, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import accuracy, fit, predict_logits
from amalgam.protocol.tls import DEFAULT_HOSTS, write_federation


@dataclass(frozen=True)
class DemoParty:
    name: str
    classes: tuple[str, ...]
    shard: str  # a digits source part


DEMO_PARTIES = (
    DemoParty("northwind", tuple("012345"), "digits:private-0"),
    DemoParty("contoso", tuple("34567"), "digits:private-1"),
    DemoParty("fabrikam", tuple("678901"), "digits:private-2"),
)
DEMO_ARCH = {"name": "small_cnn", "kwargs": {"in_shape": [1, 8, 8], "width": 16}}
TEACHER_EPOCHS = 40


def _key(party: DemoParty) -> str:
    spec = json.dumps([party.name, party.classes, party.shard, DEMO_ARCH, TEACHER_EPOCHS])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def train_demo_teacher(party: DemoParty, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Train a party's teacher on its private shard; returns it and its accuracy on the
    ``digits:test`` images of its own classes."""
    train = load_source(party.shard).restrict(list(party.classes))
    torch.manual_seed(seed)
    kwargs = dict(DEMO_ARCH["kwargs"], num_classes=len(party.classes))
    model = create_model(DEMO_ARCH["name"], **kwargs)
    fit(
        model,
        train.x,
        train.y,
        epochs=TEACHER_EPOCHS,
        batch_size=32,
        seed=seed,
        desc=f"teacher {party.name}",
    )
    test = load_source("digits:test").restrict(list(party.classes))
    return model, accuracy(predict_logits(model, test.x).argmax(dim=1), test.y)


COORDINATOR = "coordinator"


def demo_weights(party: DemoParty) -> Path:
    """The party's trained weights, trained on first use and cached."""
    weights = cache_dir() / "demo" / f"{party.name}-{_key(party)}.safetensors"
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        model, _ = train_demo_teacher(party)
        save_file(model.state_dict(), str(weights))
    return weights


def demo_party_config(
    party: DemoParty,
    folder: Path,
    certs: Path | None = None,
    address: str = "127.0.0.1:0",
    weights: Path | None = None,
    bridge: bool = False,
) -> Path:
    """Write the party's config (and train its weights, once) into ``folder``; returns the
    config path. With ``certs`` (a folder made by :func:`amalgam.protocol.tls.write_federation`) the
    party serves mutual TLS and admits the demo's coordinator, and with ``bridge`` also its
    Flower SuperNode ``<party>-node``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": party.name,
        "address": address,
        "model": {
            "arch": DEMO_ARCH["name"],
            "kwargs": dict(DEMO_ARCH["kwargs"], num_classes=len(party.classes)),
            "weights": str(weights or demo_weights(party)),
        },
        "class_names": list(party.classes),
        "input_shape": [1, 8, 8],
        "policy": {
            "predict": {"output": "probs", "round_decimals": 4},
            "max_batch": 256,
            "sample_budget": 10_000,
        },
        "audit_log": f"{party.name}-audit.jsonl",
        "audit_key": f"{party.name}-audit.key",
    }
    if certs is not None:
        config["tls"] = _tls_files(certs, party.name)
        config["policy"]["callers"] = {COORDINATOR: ["predict"]}
        if bridge:
            config["policy"]["callers"][f"{party.name}-node"] = ["predict"]
    path = folder / f"{party.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tls_files(certs: Path, identity: str) -> dict[str, str]:
    return {
        "cert": str(certs / f"{identity}.pem"),
        "key": str(certs / f"{identity}.key"),
        "ca": str(certs / "ca.pem"),
    }


def demo_job(
    addresses: dict[str, str], output_dir: str = "runs", certs: Path | None = None
) -> dict:
    """The demo's job, as a YAML-able mapping: composition over the three parties (over
    mutual TLS as the coordinator identity, with ``certs``)."""
    job = {
        "name": "digits-marketplace",
        "seed": 0,
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        "method": {"name": "composition", "params": {"rule": "restricted-fit"}},
        "student": {"arch": "small_cnn", "epochs": 40, "batch_size": 32},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": output_dir,
    }
    if certs is not None:
        job["tls"] = _tls_files(certs, COORDINATOR)
    return job


assert set(DIGIT_NAMES) == {c for p in DEMO_PARTIES for c in p.classes}


PARTY_PORT = 50051


def prepare_federation(folder: Path, one_host: bool = False) -> list[Path]:
    """Everything a three-party federation reads: certificates (a CA, each party, the
    coordinator), each party's weights and config, the job; returns the files.

    By default the files of the Flower deployment of ``deploy/compose.yaml``: the services'
    host names, every party on port 50051, a SuperNode and the SuperLink certificates too.
    With ``one_host``, files that run on this machine as they are: the parties on
    127.0.0.1:50051, 50052, 50053 and the job calling them there. Files of an earlier
    preparation in ``folder`` are replaced."""
    folder = folder.resolve()  # the configs name their files absolutely
    names = [p.name for p in DEMO_PARTIES]
    certs = folder / "certs"
    if one_host:
        written = write_federation(certs, names, [COORDINATOR], DEFAULT_HOSTS, force=True)
    else:
        hosts = [*DEFAULT_HOSTS, "superlink", *names]
        written = write_federation(certs, names, [COORDINATOR, "superlink"], hosts,
                                   supernodes=[f"{n}-node" for n in names], force=True)  # fmt: skip
    addresses = {}
    for index, party in enumerate(DEMO_PARTIES):
        weights = folder / f"{party.name}.safetensors"
        shutil.copy(demo_weights(party), weights)
        port = PARTY_PORT + index if one_host else PARTY_PORT
        listen = f"127.0.0.1:{port}" if one_host else f"0.0.0.0:{port}"
        config = demo_party_config(party, folder, certs, listen, weights, bridge=not one_host)
        written += [weights, config]
        addresses[party.name] = f"127.0.0.1:{port}" if one_host else f"{party.name}:{port}"
    job = demo_job(addresses, str(folder / "runs"), certs)
    (folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    return [*written, folder / "job.yaml"]

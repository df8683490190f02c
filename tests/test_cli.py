"""The command line: one-line errors with the right exit codes, and ``amalgam plan``."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from parties import tiny_handler

from amalgam.protocol.schemas import Policy, PredictPolicy, WeightsPolicy
from amalgam.server.cli import main
from amalgam.server.methods import METHODS
from amalgam.server.simulation.parties import serving


def _job(tmp_path, party_addresses, **overrides):
    job = {
        "name": "t",
        "parties": [{"name": n, "address": a} for n, a in party_addresses.items()],
        "method": {"name": "composition"},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": str(tmp_path / "runs"),
        "deadline_s": 2,
    }
    job.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _one_error_line(capsys) -> str:
    """The one error line on stderr (beside the job's messages), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("amalgam: error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seed": "zero"}, "seed"),
        ({"parties": [{"name": "a", "address": "nowhere"}]}, "parties.0.address"),
        ({"method": {"name": "composition", "params": {"rule": "majority"}}}, "method.params.rule"),
        ({"student": {"arch": "vgg99"}}, "student.arch"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_job_file_is_one_line_naming_file_and_field(tmp_path, capsys, overrides, field):
    path = _job(tmp_path, {"a": "127.0.0.1:1"}, **overrides)
    assert main(["fuse", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and f": {field}: " in line


def test_bad_party_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "party.yaml"
    path.write_text("name: p\nmodel: {arch: mlp}\nclass_names: [a]\ninput_shape: [1, 8, 8]\n")
    assert main(["party", "serve", "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "model" in line and "weights" in line


@pytest.mark.parametrize("command", ["fuse", "plan"])
def test_a_job_without_tls_needs_insecure(tmp_path, capsys, command):
    path = _job(tmp_path, {"a": "127.0.0.1:1"})
    assert main([command, str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "tls: no certificates" in line and "--insecure" in line


def test_a_party_without_tls_needs_insecure(tmp_path, capsys):
    path = tmp_path / "party.yaml"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    path.write_text(
        "name: p\nmodel: {arch: mlp, weights: w.safetensors}\nclass_names: [a]\n"
        "input_shape: [1, 8, 8]\n"
    )
    assert main(["party", "serve", "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "tls: no certificates" in line and "--insecure" in line


def test_invalid_yaml_names_the_file(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: [unclosed\n")
    assert main(["plan", str(path)]) == 2
    assert str(path) in _one_error_line(capsys)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_party_is_named_with_its_address(tmp_path, capsys):
    address = f"127.0.0.1:{_closed_port()}"
    assert main(["fuse", "--insecure", str(_job(tmp_path, {"ghost": address}))]) == 1
    line = _one_error_line(capsys)
    assert "party ghost" in line and address in line and "unreachable" in line


def test_denied_party_stops_the_job_with_one_line(tmp_path, capsys):
    with serving(tiny_handler(tmp_path, Policy(), classes=[str(d) for d in range(10)])) as a:
        assert main(["fuse", "--insecure", str(_job(tmp_path, {"acme": a}))]) == 1
    assert "party acme: Predict is not granted" in _one_error_line(capsys)


def _plan(tmp_path, capsys, acme: Policy) -> str:
    """``amalgam plan``'s output for acme under ``acme`` and globex releasing labels."""
    labels = Policy(predict=PredictPolicy(output="label"))
    with (
        serving(tiny_handler(tmp_path, acme, name="acme")) as a,
        serving(tiny_handler(tmp_path, labels, name="globex")) as b,
    ):
        assert main(["plan", "--insecure", str(_job(tmp_path, {"acme": a, "globex": b}))]) == 0
    return capsys.readouterr().out


def test_plan_says_which_methods_are_possible_and_why_not(tmp_path, capsys):
    out = _plan(tmp_path, capsys, Policy(predict=PredictPolicy(output="logits")))
    assert "composition      possible" in out
    assert "consolidate      not possible\n    - no party grants weights" in out
    assert "acme: bn_feedback is not granted" in out
    assert "party globex: classes cat,dog,eel; grants predict (predict releases label)" in out


def test_plan_names_exactly_the_methods_a_job_accepts(tmp_path, capsys):
    from typing import get_args

    from amalgam.server.jobspec import MethodSection

    granting = Policy(predict=PredictPolicy(output="logits"), weights=WeightsPolicy())
    out = _plan(tmp_path, capsys, granting)
    planned = [line.split()[0] for line in out.splitlines() if "possible" in line]
    sections = get_args(get_args(MethodSection)[0])
    accepted = [get_args(section.model_fields["name"].annotation)[0] for section in sections]
    assert planned == accepted == list(METHODS)
    # acme could be the generalist, but globex releases labels only
    assert "consolidate      not possible\n    - globex: predict releases label" in out


def test_example_files_in_deploy_validate(tmp_path):
    import shutil
    from pathlib import Path

    from amalgam.party.config import load_party_config
    from amalgam.protocol.tls import write_federation
    from amalgam.server.job import load_job

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    for example in deploy.glob("*.yaml"):
        shutil.copy(example, tmp_path)
    write_federation(tmp_path / "certs", ["northwind"], ["coordinator"])  # as the files say
    config = load_party_config(tmp_path / "party.example.yaml")
    assert config.policy.predict.output == "probs"
    assert config.tls.cert == str(tmp_path / "certs" / "northwind.pem")
    assert config.policy.allows("coordinator", "predict")
    job = load_job(tmp_path / "job.example.yaml")
    assert job.method.params.rule == "restricted-fit" and job.tls.ca.endswith("ca.pem")
    assert load_job(deploy / "job.datafree.example.yaml").method.params.variant == "dfmf"
    assert load_job(deploy / "job.ot.example.yaml").method.params.balance == "merge"
    detection = load_job(deploy / "job.detection.example.yaml")
    assert detection.method.params.detection_rule == "consensus"
    assert detection.student.arch == "fcos"
    consolidate = load_job(deploy / "job.consolidate.example.yaml").method.params
    assert consolidate.generalist == "generalist-lab" and len(consolidate.tasks) == 2


def test_a_party_answering_under_another_name_is_refused(tmp_path, capsys):
    with serving(tiny_handler(tmp_path, name="globex")) as address:
        assert main(["fuse", "--insecure", str(_job(tmp_path, {"acme": address}))]) == 2
    line = _one_error_line(capsys)
    assert f"parties.0: the party at {address} is 'globex', not 'acme'" in line


def test_market_composes_local_parties_and_reuses_their_teachers(tmp_path, capsys, monkeypatch):
    from amalgam.server.simulation import market

    args = ["market", "--parties", "3", "--engine", "grpc", "--epochs", "20",
            "--pretrained", str(tmp_path / "teachers")]  # fmt: skip
    assert main([*args, "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "3 parties over grpc" in out
    summary = next(line for line in out.splitlines() if line.startswith("mean teacher"))
    student = float(summary.split("student ")[1].split("%")[0])
    best = float(summary.split("best teacher ")[1].split("%")[0])
    assert student > best + 20  # each party knows half the classes
    (first,) = (tmp_path / "runs").glob("market-3-grpc-*/metrics.json")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "teachers").iterdir()) == [
        "org000", "org001", "org002"
    ]  # fmt: skip

    def no_training(*args, **kwargs):
        raise AssertionError("a kept teacher was trained again")

    monkeypatch.setattr(market, "train_party", no_training)
    assert main([*args, "--output-dir", str(tmp_path / "again")]) == 0
    (second,) = (tmp_path / "again").glob("market-3-grpc-*/metrics.json")
    teachers = [
        {k: v for k, v in json.loads(p.read_text())["results"].items() if k.startswith("teacher")}
        for p in (first, second)
    ]
    assert teachers[0] == teachers[1] and len(teachers[0]) == 3


def test_a_market_larger_than_its_data_says_how_many_parties_it_supports(capsys):
    assert main(["market", "--parties", "200"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("amalgam: error: parties: 200 parties leave org")
    assert "digits supports about 23 parties" in line


def _party_file(tmp_path, **overrides) -> str:
    """A valid party file over a saved three-class MLP, with ``overrides``."""
    from safetensors.torch import save_file

    from amalgam.fusion.models import create_model

    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=3, hidden=8)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    config = {
        "name": "p",
        "address": "127.0.0.1:0",
        "model": {
            "arch": "mlp",
            "kwargs": {"in_shape": [1, 8, 8], "num_classes": 3, "hidden": 8},
            "weights": "w.safetensors",
        },
        "class_names": ["a", "b", "c"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {}},
        **overrides,
    }
    path = tmp_path / "party.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"address": "0.0.0.0"}, "address: '0.0.0.0' is not host:port; give the port"),
        ({"input_shape": [3, 8, 8]}, "input_shape: a forward pass on inputs of shape [3, 8, 8]"),
        ({"class_names": ["a", "b"]}, "class_names: 2 names for a model with 3 outputs"),
        ({"model": {"arch": "mlp", "weights": "party.yaml"}}, "model.weights: "),
        ({"model": {"program": "w.safetensors"}}, "is not a torch.export program"),
        ({"device": "cuda:7"}, "device: cuda:7 is not present"),
    ],
)
def test_a_party_that_cannot_start_says_why_in_one_line(tmp_path, capsys, overrides, message):
    path = _party_file(tmp_path, **overrides)
    assert main(["party", "serve", "--config", path, "--insecure"]) == 2
    line = _one_error_line(capsys)
    assert path in line and message in line


def test_a_port_another_agent_holds_is_refused_not_shared(tmp_path, capsys):
    with serving(tiny_handler(tmp_path)) as address:
        path = _party_file(tmp_path, address=address)
        assert main(["party", "serve", "--config", path, "--insecure"]) == 2
    line = _one_error_line(capsys)
    assert f"address: cannot listen on {address}: the port is taken" in line


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    path = _job(tmp_path, {"a": "127.0.0.1:1"}, output_dir=str(tmp_path / "runs"))
    assert main(["fuse", str(path), "--insecure"]) == 2
    line = _one_error_line(capsys)
    assert f"output_dir: {tmp_path / 'runs'} is a file, not a folder" in line

"""The ``ot`` and ``clafusion`` job methods end to end through real gRPC parties on the
digits, the planner, and the refusals a user can meet."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from parties import tiny_handler
from permuted import permuted_copy

from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.ot import fusion_spec
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.party.local import LocalTeacher
from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import (
    LayersPolicy,
    Normalization,
    Policy,
    PredictPolicy,
    WeightsPolicy,
)
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.plan import plan
from amalgam.server.simulation.parties import local_party, serving

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DIGITS = [str(d) for d in range(10)]
SHARING = Policy(
    predict=PredictPolicy(output="logits"),
    gram=LayersPolicy(layers=["*"]),
    activations=LayersPolicy(layers=["*"]),
    weights=WeightsPolicy(),
    sample_budget=None,
)


def _party(folder, name: str, hidden: tuple[int, ...], shard: int, policy=SHARING, **kwargs):
    data = load_source(f"digits:private-{shard}")
    torch.manual_seed(shard)
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, hidden=hidden)
    fit(model, data.x, data.y, epochs=40, batch_size=32, progress=False)
    return local_party(name, model, DIGITS, (1, 8, 8), policy, folder, **kwargs)


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weightfusion")
    return {
        "deep": _party(folder, "deep", (48, 32, 24), 0),
        "shallow": _party(folder, "shallow", (48, 24), 1),
        "twin": _party(folder, "twin", (48, 24), 2),
    }


def _job(tmp_path, addresses: dict[str, str], method: str, params: dict, data: dict) -> str:
    job = {
        "name": "wf",
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        "method": {"name": method, "params": params},
        "data": {"test": "digits:test", **data},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _run(tmp_path, handlers, method, params, data):
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        addresses = {handlers[0].name: a0, handlers[1].name: a1}
        spec = load_job(_job(tmp_path, addresses, method, params, data))
        return run_job(spec, connect(spec), progress=False, log=lambda message: None)


def test_clafusion_job_over_grpc(parties, tmp_path):
    handlers = [parties["deep"], parties["shallow"]]
    marks = {h.name: len(read_records(h.audit.path)) for h in handlers}
    run_dir = _run(
        tmp_path, handlers, "clafusion", {"probe_size": 100}, {"unlabeled": "digits:public"}
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results = metrics["results"]
    assert {"teacher:deep", "teacher:shallow", "ensemble", "student"} <= set(results)
    assert "vanilla_avg" not in results  # different depths: nothing to average directly
    assert results["teacher:deep"] > 0.8 and results["teacher:shallow"] > 0.8
    assert results["student"] > 0.3  # one shot, no fine-tuning: far above chance (0.1)
    extra = metrics["extra"]
    assert extra["base"] == "shallow"  # the shallower network, deepened with an identity layer
    assert extra["alignments"]["hidden"]["deep"] == [0, 2]
    assert extra["fused_architecture"]["kwargs"]["hidden"] == [48, 48, 24]
    assert (run_dir / "cka-hidden-deep.png").read_bytes().startswith(b"\x89PNG")
    assert (run_dir / "transport-cost.png").read_bytes().startswith(b"\x89PNG")
    student = json.loads((run_dir / "student.json").read_text())
    assert student["normalization"] == {"mean": [0.0], "std": [1.0]}
    for handler in handlers:
        methods = [r["method"] for r in read_records(handler.audit.path)[marks[handler.name] :]]
        assert "ExportWeights" in methods and "Gram" in methods  # CKA computed at the party
    report = (run_dir / "report.md").read_text()
    assert (
        "Cross-layer map, hidden, deep and shallow (the shallower network's layers -> the "
        "deeper's): [0, 2]." in report.replace("\n", " ")
    )


def test_ot_job_with_activation_metric_and_fine_tuning(parties, tmp_path):
    handlers = [parties["shallow"], parties["twin"]]
    params = {
        "ground_metric": "activation", "finetune_epochs": 3, "weights": [0.5, 0.5], "repair": True
    }  # fmt: skip
    data = {"unlabeled": "digits:public", "finetune": "digits:public"}
    run_dir = _run(tmp_path, handlers, "ot", params, data)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results = metrics["results"]
    # the MLPs' hidden linear layers are repaired, not the classifier
    assert metrics["extra"]["repaired_layers"] == ["body.1", "body.3"]
    assert "REPAIR set the channel statistics of 2 layers" in (run_dir / "report.md").read_text()
    assert {"vanilla_avg", "fused_one_shot", "student", "finetuned:shallow"} <= set(results)
    assert results["student"] >= results["fused_one_shot"] - 0.02
    audit = read_records(parties["twin"].audit.path)
    assert any(r["method"] == "Activations" and r["decision"] == "granted" for r in audit)


WEIGHT_METRIC_ONLY = {"ground_metric": "weight", "recompute_batchnorm": False}  # no probe images


def test_ot_job_fuses_torchvision_parties_back(tmp_path):
    # a torchvision network, and its twin with every neuron group permuted (the same function
    # in other weights), exported by two parties: fused, they give back the network
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", in_shape=(1, 8, 8), num_classes=10)
    data = load_source("digits:private-0")
    fit(model, data.x, data.y, epochs=1, batch_size=64, progress=False)
    model.eval()
    twin = permuted_copy(model, fusion_spec(model))
    handlers = [local_party(name, network, DIGITS, (1, 8, 8), SHARING, tmp_path)
                for name, network in (("own", model), ("twin", twin))]  # fmt: skip
    run_dir = _run(tmp_path, handlers, "ot", WEIGHT_METRIC_ONLY, {})
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert results["teacher:own"] == results["teacher:twin"]
    assert results["student"] == results["teacher:own"]


def test_clafusion_job_fuses_torchvision_parties_of_different_depths(tmp_path):
    # torchvision's resnet18 and resnet34: the fused network is a resnet34, the blocks that
    # resnet18 lacks filled with zero-residual blocks before fusing; with all the weight on
    # resnet18 it computes resnet18's function
    handlers = []
    for seed, name in enumerate(("resnet18", "resnet34")):
        torch.manual_seed(seed)
        model = create_model(f"torchvision:{name}", in_shape=(1, 8, 8), num_classes=10)
        data = load_source(f"digits:private-{seed}")
        fit(model, data.x, data.y, epochs=1, batch_size=64, progress=False)
        handlers.append(local_party(name, model.eval(), DIGITS, (1, 8, 8), SHARING, tmp_path))
    params = {"probe_size": 64, "weights": [1.0, 0.0], "recompute_batchnorm": False}
    run_dir = _run(tmp_path, handlers, "clafusion", params, {"unlabeled": "digits:public"})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    extra = metrics["extra"]
    assert extra["base"] == "resnet18"  # the shallower network
    assert extra["fused_architecture"]["name"] == "torchvision:resnet34"
    # stem, then the four stages: (2, 2, 2, 2) blocks placed among (3, 4, 6, 3), first and
    # last pinned
    maps = {section: m["resnet18"] for section, m in extra["alignments"].items()}
    assert maps["section0"] == [0] and maps["section1"] == [0, 2] and maps["section3"] == [0, 5]
    report = (run_dir / "report.md").read_text().replace("\n", " ")
    assert "Cross-layer map, section1, resnet18 and resnet34 (the shallower" in report
    results = metrics["results"]
    assert results["student"] == results["teacher:resnet18"] != results["teacher:resnet34"]
    for handler in handlers:
        assert "Gram" in [r["method"] for r in read_records(handler.audit.path)]


def test_ot_refuses_networks_of_different_depth(parties, tmp_path):
    handlers = [parties["deep"], parties["shallow"]]
    with pytest.raises(ValueError, match="use CLAFusion"):
        _run(tmp_path, handlers, "ot", WEIGHT_METRIC_ONLY, {})


def test_a_party_with_another_normalisation_is_named(parties, tmp_path):
    other = _party(
        tmp_path, "other", (48, 24), 2, normalization=Normalization(mean=[0.5], std=[0.5])
    )
    with pytest.raises(ValueError, match=r"parties.1 \(other\): mean \[0.5\] differs"):
        _run(tmp_path, [parties["shallow"], other], "ot", WEIGHT_METRIC_ONLY, {})


def test_planner_offers_weight_fusion_only_where_weights_are_granted(tmp_path):
    granted = tiny_handler(tmp_path, Policy(predict=PredictPolicy(), weights=WeightsPolicy()))
    refused = tiny_handler(tmp_path, Policy(predict=PredictPolicy()), name="globex")
    verdicts = {p.method: p for p in plan([LocalTeacher(granted).info, LocalTeacher(refused).info])}
    assert not verdicts["ot"].possible
    assert verdicts["ot"].reasons == ("globex: weights is not granted",)
    assert verdicts["clafusion"].reasons == ("globex: weights is not granted",)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_models_do_not_advertise_weights(tmp_path):
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=3, hidden=8).eval()
    model = torch.jit.trace(model, torch.rand(2, 1, 8, 8))
    handler = tiny_handler(
        tmp_path, Policy(predict=PredictPolicy(), weights=WeightsPolicy()), model=model
    )
    assert "weights" not in handler.info.capabilities
    with pytest.raises(PermissionError, match="not a registered architecture"):
        LocalTeacher(handler).weights()


def test_policy_naming_an_unknown_layer_is_a_configuration_error(tmp_path):
    policy = Policy(gram=LayersPolicy(layers=["body.1", "body.99"]))
    with pytest.raises(ValueError, match=r"policy.gram.layers: the model has no layer 'body.99'"):
        tiny_handler(tmp_path, policy)


@pytest.mark.parametrize(
    ("method", "params", "data", "message"),
    [
        ("ot", {"weights": [1.0]}, {}, r"method.params.weights: 1 given for 2 parties"),
        ("ot", {"base": "nobody"}, {}, r"method.params.base: 'nobody' is not one of the parties"),
        ("clafusion", {}, {}, r"data.unlabeled: clafusion needs probe images"),
        ("ot", {}, {}, r"data.unlabeled: ground_metric activation \(the default\) needs probe"),
        ("ot", {"ground_metric": "weight"}, {}, r"data.unlabeled: recompute_batchnorm needs"),
        ("ot", {**WEIGHT_METRIC_ONLY, "finetune_epochs": 1}, {}, r"data.finetune"),
        ("ot", {**WEIGHT_METRIC_ONLY, "repair": True}, {}, r"data.unlabeled: repair needs probe"),
    ],
)
def test_job_file_errors_name_the_field(tmp_path, method, params, data, message):
    path = _job(tmp_path, {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}, method, params, data)
    with pytest.raises(ConfigError, match=message):
        load_job(path)


def test_fusing_parties_in_python_without_images_names_what_needs_them(parties):
    from amalgam.fusion.ot import WeightFusionParams, fuse_parties

    teachers = [LocalTeacher(parties["shallow"]), LocalTeacher(parties["twin"])]
    params = WeightFusionParams(ground_metric="weight", recompute_batchnorm=False, repair=True)
    with pytest.raises(ValueError, match=r"^unlabeled: recompute_batchnorm and repair need"):
        fuse_parties(teachers, params, load_source("digits:test"))

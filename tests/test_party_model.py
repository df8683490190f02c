"""The party loads its private model from TorchScript or from an architecture plus weights."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from amalgam.fusion.models import create_model
from amalgam.party.config import load_party_config
from amalgam.party.handler import PartyHandler
from amalgam.server.simulation.parties import local_party

KWARGS = {"in_shape": [1, 8, 8], "num_classes": 3, "hidden": 8}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mlp", **KWARGS).eval()


def _config(tmp_path, model_section):
    config = {
        "name": "p",
        "model": model_section,
        "class_names": ["a", "b", "c"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {"output": "logits"}},
    }
    path = tmp_path / "sub" / "party.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("save", ["torchscript", "safetensors", "torch.save"])
def test_every_model_source_gives_the_owners_outputs(tmp_path, model, save):
    folder = tmp_path / "sub"
    folder.mkdir()
    if save == "torchscript":
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 8, 8)), str(folder / "m.pt"))
        section = {"torchscript": "m.pt"}  # relative to the config's folder
    elif save == "safetensors":
        save_file(model.state_dict(), str(folder / "m.safetensors"))
        section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.safetensors"}
    else:
        torch.save(model.state_dict(), folder / "m.pt")
        section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.pt"}
    config = load_party_config(_config(tmp_path, section))
    handler = PartyHandler.from_config(config)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(handler.predict(x, caller="owner"), expected)
    assert config.audit_log == str(folder / "audit.jsonl")
    assert all(not p.requires_grad for p in handler.model.parameters())


def test_a_pickled_object_is_refused(tmp_path, model):
    folder = tmp_path / "sub"
    folder.mkdir()
    torch.save({"weights": model.state_dict(), "hook": print}, folder / "m.pt")
    section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.pt"}
    with pytest.raises(Exception, match="[Ww]eights only"):
        PartyHandler.from_config(load_party_config(_config(tmp_path, section)))


def _export(model: torch.nn.Module, path, shape=(3, 32, 32), dynamic: bool = True) -> None:
    example = (torch.rand(2, *shape),)
    dims = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), example, dynamic_shapes=dims), str(path))


def _serve(tmp_path, section, policy=None, classes=3, shape=(3, 32, 32)):
    config = {
        "name": "p",
        "model": section,
        "class_names": [f"c{k}" for k in range(classes)],
        "input_shape": list(shape),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "policy": policy or {"predict": {"output": "logits"}},
    }
    path = tmp_path / "party.yaml"
    path.write_text(yaml.safe_dump(config))
    return PartyHandler.from_config(load_party_config(path))


@pytest.fixture(scope="module")
def resnet18():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    for module in model.modules():  # running statistics unlike the defaults
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_a_torch_export_program_serves_predictions_layers_and_batchnorm_feedback(
    tmp_path, resnet18
):
    from amalgam.fusion.teacher import GeneratorObjective

    _export(resnet18, tmp_path / "r18.pt2")
    policy = {
        "predict": {"output": "logits"},
        "activations": {"layers": ["layer1.0.bn1"]},
        "bn_feedback": {},
    }
    program = _serve(tmp_path, {"program": "r18.pt2"}, policy)
    eager = local_party("eager", resnet18, ["c0", "c1", "c2"], (3, 32, 32),
                        program.policy, tmp_path, program.normalization)  # fmt: skip
    assert program.info.batchnorm_layers == eager.info.batchnorm_layers == 20
    x = torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(
        program.predict(x, "owner"), eager.predict(x, "owner"), atol=1e-5, rtol=1e-4
    )
    outputs = program.layers(x, ["layer1.0.bn1"], "owner")["layer1.0.bn1"]
    assert outputs.shape == (5, 64, 8, 8)
    torch.testing.assert_close(outputs, eager.layers(x, ["layer1.0.bn1"], "owner")["layer1.0.bn1"])
    objective = GeneratorObjective()
    ours = program.bn_feedback(x, "owner", objective)
    theirs = eager.bn_feedback(x, "owner", objective)
    assert ours.losses["bn"] > 0
    assert ours.losses["bn"] == pytest.approx(theirs.losses["bn"], rel=1e-4)
    torch.testing.assert_close(ours.input_grad, theirs.input_grad, atol=1e-6, rtol=1e-3)


def test_a_library_architecture_by_name_loads_the_owners_weights(tmp_path, resnet18):
    import timm

    save_file(resnet18.state_dict(), str(tmp_path / "r18.safetensors"))
    handler = _serve(tmp_path, {"arch": "resnet18", "weights": "r18.safetensors"})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = resnet18((x - 0.5) / 0.25)
    torch.testing.assert_close(handler.predict(x, "owner"), expected)
    assert handler.info.batchnorm_layers == 20
    torch.manual_seed(1)
    efficientnet = timm.create_model("test_efficientnet", num_classes=3, in_chans=1)
    torch.save(efficientnet.state_dict(), tmp_path / "e.pt")
    section = {"arch": "timm:test_efficientnet", "kwargs": {"in_chans": 1}, "weights": "e.pt"}
    handler = _serve(tmp_path, section, shape=(1, 16, 16))
    assert handler.info.batchnorm_layers == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in efficientnet.modules()
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_is_quiet_and_refuses_at_start_what_it_cannot_do(tmp_path, resnet18, recwarn):
    torch.jit.save(torch.jit.script(resnet18), str(tmp_path / "r18.pt"))
    recwarn.clear()
    handler = _serve(tmp_path, {"torchscript": "r18.pt"})
    assert handler.info.batchnorm_layers == 20
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
    for capability, grant in [("gram", {"layers": ["*"]}), ("bn_feedback", {})]:
        with pytest.raises(ValueError, match=rf"^policy\.{capability}: .*TorchScript.*\.pt2"):
            _serve(tmp_path, {"torchscript": "r18.pt"}, {"predict": {}, capability: grant})


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("not a model", r"^model\.program: .*x\.pt2 is not a torch\.export program"),
        ("missing", r"^model\.program: .*x\.pt2 does not exist"),
        ("static batch", r"^model\.program: .* batches of exactly 2; export it with a dynamic"),
        ("weights misfit", r"^model\.weights: .*x\.pt2 does not fit resnet18: .* of another shape"),
        ("unknown arch", r"^model\.arch: unknown architecture 'resnet1800'"),
        ("input shape", r"^input_shape: a forward pass on inputs of shape \[1, 32, 32\] failed"),
        ("classes", r"^class_names: 4 names for a model with 3 outputs"),
    ],
)
def test_a_model_that_cannot_serve_is_refused_at_start_in_one_line(
    tmp_path, resnet18, problem, message
):
    path = tmp_path / "x.pt2"
    section, classes, shape = {"program": "x.pt2"}, 3, (3, 32, 32)
    if problem == "not a model":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    elif problem == "static batch":
        _export(resnet18, path, dynamic=False)
    elif problem in ("weights misfit", "unknown arch"):
        torch.save(resnet18.fc.state_dict() | {"fc.weight": torch.zeros(5, 512)}, path)
        name = "resnet18" if problem == "weights misfit" else "resnet1800"
        section = {"arch": name, "weights": "x.pt2"}
    elif problem in ("input shape", "classes"):
        _export(resnet18, path)
        shape, classes = ((1, 32, 32), 3) if problem == "input shape" else ((3, 32, 32), 4)
    with pytest.raises(ValueError, match=message) as raised:
        _serve(tmp_path, section, classes=classes, shape=shape)
    assert "\n" not in str(raised.value)


def test_a_spent_budget_stays_spent_across_a_restart(tmp_path, model):
    import grpc

    from amalgam.protocol import CALLER_METADATA_KEY
    from amalgam.protocol._generated import party_pb2, party_pb2_grpc
    from amalgam.protocol.codec import tensor_to_proto
    from amalgam.server.simulation.parties import serving

    folder = tmp_path / "sub"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "m.safetensors"))
    section = {"arch": "mlp", "kwargs": KWARGS, "weights": "m.safetensors"}
    path = _config(tmp_path, section)
    config = yaml.safe_load(path.read_text())
    config["policy"]["sample_budget"] = 10
    path.write_text(yaml.safe_dump(config))
    first = PartyHandler.from_config(load_party_config(path))
    first.predict(torch.rand(6, 1, 8, 8), caller="owner")
    restarted = PartyHandler.from_config(load_party_config(path))  # same config, same log
    assert restarted.samples_used("owner") == 6
    request = party_pb2.PredictRequest(inputs=tensor_to_proto(torch.rand(5, 1, 8, 8)))
    with serving(restarted) as address, grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            party_pb2_grpc.PartyServiceStub(channel).Predict(
                request, timeout=10, metadata=[(CALLER_METADATA_KEY, "owner")]
            )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 left, 5 asked" in refused.value.details()

"""Students and party models from torchvision and timm by name, started from local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from amalgam.fusion.models import create_model, is_architecture
from amalgam.fusion.train import StudentConfig, build_student
from amalgam.fusion.zoo import resolve


@pytest.mark.parametrize(
    ("name", "library"),
    [
        ("resnet18", "torchvision"),
        ("torchvision:mobilenet_v3_small", "torchvision"),
        ("timm:resnet18", "timm"),
        ("test_efficientnet", "timm"),  # not torchvision's: timm's
    ],
)
def test_names_resolve_to_their_library(name, library):
    assert resolve(name)[0] == library
    assert is_architecture(name)


def test_unknown_names_are_refused_naming_every_place_looked():
    assert resolve("resnet1800") is None and resolve("keras:resnet18") is None
    with pytest.raises(ValueError, match=r"'resnet1800': neither the registry \(.*mlp.*\), "):
        create_model("resnet1800", in_shape=(3, 32, 32), num_classes=10)


@pytest.mark.parametrize(
    "name",
    ["resnet18", "timm:test_efficientnet", "mobilenet_v3_small", "timm:mobilenetv3_small_050"],
)
def test_a_library_student_takes_small_grey_images_and_has_the_registry_interface(name):
    torch.manual_seed(0)
    model = create_model(name, in_shape=(1, 8, 8), num_classes=3).eval()
    x = torch.rand(4, 1, 8, 8)
    features = model.forward_features(x)  # (4, F)
    assert features.shape == (4, model.num_features)
    assert model(x).shape == (4, 3) and model.head.out_features == 3
    assert model.arch == {"name": name, "kwargs": {"in_shape": (1, 8, 8), "num_classes": 3}}
    rebuilt = create_model(name, **model.arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # the card's architecture rebuilds it
    torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_a_student_starts_from_the_tensors_of_a_weights_file_that_fit(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000)  # the library's own names
    save_file(imagenet.state_dict(), str(tmp_path / "r18.safetensors"))
    said = []
    config = StudentConfig(arch="resnet18", init=str(tmp_path / "r18.safetensors"))
    student = build_student(config, (3, 32, 32), 10, log=said.append)
    torch.testing.assert_close(student.body.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(student.body.layer4[1].bn2.running_var,
                               imagenet.layer4[1].bn2.running_var)  # fmt: skip
    assert student.head.out_features == 10  # a classifier over other classes stays fresh
    assert said == [f"student: 120 tensors from {tmp_path / 'r18.safetensors'}, 2 left fresh"]


def test_a_student_that_cannot_be_built_or_started_is_refused_in_one_line(tmp_path):
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    config = StudentConfig(arch="small_cnn", init=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"^student\.init: .*other\.safetensors fits none"):
        build_student(config, (1, 8, 8), 10)
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    config = StudentConfig(arch="small_cnn", init=str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match=r"^student\.init: .*junk\.pt: not a readable state"):
        build_student(config, (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"^student\.arch: vit_b_16: a forward pass on inputs"):
        build_student(StudentConfig(arch="vit_b_16"), (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"^student\.arch: resnet18: .*unexpected keyword"):
        build_student(StudentConfig(arch="resnet18", kwargs={"depth": 3}), (3, 32, 32), 10)

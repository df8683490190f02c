"""fusion/ot/graph.py: the alignment structure derived from a network's traced graph equals
the registry's hand-written one, and lets OT fusion bring a permuted copy of a torchvision or
timm network back to the original."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from permuted import permuted_copy
from torch import nn
from torchvision.models.convnext import CNBlockConfig

from amalgam.fusion.models import create_model
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import ot_fuse
from amalgam.fusion.ot.graph import traced_spec
from amalgam.fusion.ot.spec import FusionSpec, UnsupportedNetwork, fusion_spec

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REGISTRY = {
    "mlp": dict(name="mlp", in_shape=(1, 8, 8), hidden=(24, 16, 12)),
    "vgg": dict(name="vgg_cnn", in_shape=(3, 16, 16), stages=((6,), (8, 8)), fc=(12,)),
    "resnet8": dict(name="resnet8_cifar", in_shape=(3, 16, 16)),
    "resnet20": dict(name="resnet20_cifar", in_shape=(3, 16, 16)),
}


def _partition(spec: FusionSpec) -> tuple[dict, set]:
    """Each tensor's axes as the first (tensor, axis) of their group: equal for two specs
    that group the same axes, whatever they call the groups; and the groups' producers."""
    first: dict[str, tuple[str, int]] = {}
    canonical = {}
    for name in sorted(spec.axes):
        canonical[name] = tuple(
            None if group is None else first.setdefault(group, (name, axis))
            for axis, group in enumerate(spec.axes[name])
        )
    names = {group: first[group] for group in first}
    producers = {(names[g.name], p) for g in spec.groups for p in g.producers}
    return canonical, producers


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_derived_structure_equals_the_hand_written_one(kind):
    kwargs = dict(REGISTRY[kind])
    model = create_model(kwargs.pop("name"), num_classes=5, **kwargs)
    derived, written = traced_spec(model, kwargs["in_shape"]), fusion_spec(model)
    assert _partition(derived) == _partition(written)
    assert len(derived.groups) == len(written.groups)


def _trained_like(model: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
    """``model`` with BatchNorm statistics away from their initial values, in eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *in_shape) * 2 + 0.5)
    return model.eval()


def _vgg11_bn() -> nn.Module:
    """torchvision's vgg11_bn with its 4,096-wide classifier narrowed to 64 (the graph is the
    same; the test's transport problems stay small)."""
    model = torchvision.models.vgg11_bn(num_classes=10)
    model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
    model.classifier[3] = nn.Linear(64, 64)
    model.classifier[6] = nn.Linear(64, 10)
    return model


def _convnext() -> nn.Module:
    """torchvision's ConvNeXt (channels-last blocks, layer scale, stochastic depth) in two
    narrow stages of one block each: convnext_tiny's graph at a test's size."""
    stages = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return torchvision.models.convnext.ConvNeXt(stages, stochastic_depth_prob=0.1, num_classes=10)


ECOSYSTEM = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "vgg11_bn": (_vgg11_bn, (3, 32, 32)),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        (3, 32, 32),
    ),  # fmt: skip
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "convnext": (_convnext, (3, 32, 32)),
    "timm-efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", num_classes=10),
        (3, 32, 32),
    ),  # fmt: skip
    "timm-convnext_atto": (
        lambda: timm.create_model("convnext_atto", num_classes=10),
        (3, 32, 32),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(ECOSYSTEM))
def test_ecosystem_network_fuses_back_from_a_permuted_copy(name):
    build, in_shape = ECOSYSTEM[name]
    torch.manual_seed(0)
    model = _trained_like(build(), in_shape)
    spec = traced_spec(model, in_shape)
    clone = permuted_copy(model, spec)
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(1))
    first = spec.groups[0].producers[0]
    assert not torch.equal(model.state_dict()[first], clone.state_dict()[first])
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), atol=1e-4, rtol=1e-4)  # same function
    config = OTFusionConfig(ground_metric="weight", plan="emd")
    fused = ot_fuse([model, clone], config, in_shape=in_shape).model
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], tensor, atol=1e-5, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


def test_a_residual_stream_is_compared_on_every_layer_that_writes_it():
    spec = traced_spec(torchvision.models.resnet18(num_classes=10).eval(), (3, 32, 32))
    groups = {g.name: g for g in spec.groups}
    stream = groups["layer2.0.conv2"]  # stage 2's stream: its shortcut and both blocks write it
    assert {"layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"} <= set(stream.probes)
    assert groups["layer2.0.conv1"].probes == ("layer2.0.bn1",)  # one writer: one probe
    # every probe layer carries its group: no layer is compared for two groups
    layers = [layer for g in spec.groups for layer in g.probes]
    assert len(layers) == len(set(layers))

    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        models = [model, permuted_copy(model, spec)]
        fused = ot_fuse(models, probe=torch.randn(8, 3, 32, 32)).model  # activation metric
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], tensor, atol=1e-5, rtol=0)


def test_unsupported_operations_are_named():
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], dim=1)
            return self.head(y.mean((2, 3)))

    with pytest.raises(UnsupportedNetwork, match=r"'cat'.*concatenation"):
        traced_spec(Concat(), (3, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 2))  # fmt: skip
    with pytest.raises(UnsupportedNetwork, match=r"grouped convolution \(groups=2\)"):
        traced_spec(grouped, (4, 8, 8))


def test_library_classifier_on_small_grey_images_fuses_back():
    # the registry's wrapper of a torchvision network: grey 16x16 images repeated to three
    # channels and upsampled before the network, all of it traced
    model = _trained_like(create_model("torchvision:resnet18", in_shape=(1, 16, 16),
                                       num_classes=4), (1, 16, 16))  # fmt: skip
    clone = permuted_copy(model, fusion_spec(model))
    fused = ot_fuse([model, clone], OTFusionConfig(ground_metric="weight")).model
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)

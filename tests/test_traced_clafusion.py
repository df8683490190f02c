"""fusion/ot/units.py and CLAFusion of traced networks: sections and units derived from the
graph, networks of different depths balanced by identity units that keep their function,
and one-line refusals for what cannot be balanced."""

from __future__ import annotations

import pytest
import torch
import torchvision
from permuted import permuted_copy
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG, make_layers

from amalgam.fusion.models import create_model
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import clafusion
from amalgam.fusion.ot.graph import traced_spec
from amalgam.fusion.ot.spec import UnsupportedNetwork
from amalgam.fusion.ot.widths import resized

pytestmark = pytest.mark.usefixtures("torch_single_thread")

IN_SHAPE = (3, 32, 32)


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with BatchNorm statistics and affine parameters off their initial values,
    in eval mode."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.1)
        for _ in range(2):
            model(torch.randn(8, *IN_SHAPE) * 2 + 0.5)
    return model.eval()


def _vgg(layers: list) -> nn.Module:
    """A torchvision VGG of the configuration ``layers`` (widths, "M" for max pooling) with a
    small global-average-pooled classifier."""
    with torch.device("meta"):  # torchvision's 120M-weight classifier, replaced below
        model = VGG(nn.Sequential(), num_classes=5, init_weights=False)
    model.features = make_layers(layers, batch_norm=True)
    width = [w for w in layers if w != "M"][-1]
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 5))
    return model


def _convnext(depths: tuple[int, int]) -> nn.Module:
    """torchvision's ConvNeXt (channels-last blocks, LayerNorm, layer scale) in two narrow
    stages of ``depths`` blocks."""
    stages = [CNBlockConfig(16, 32, depths[0]), CNBlockConfig(32, None, depths[1])]
    return ConvNeXt(stages, layer_scale=0.5, num_classes=5)


PAIRS = {  # (shallower, deeper): one family, same widths
    "vgg": (lambda: _vgg([8, "M", 16, "M", 16]), lambda: _vgg([8, 8, "M", 16, "M", 16, 16, 16])),
    "resnet": (
        lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5),
        lambda: ResNet(BasicBlock, [2, 1, 3, 1], num_classes=5),
    ),
    "convnext": (lambda: _convnext((1, 1)), lambda: _convnext((2, 3))),
    "efficientnet": (  # b1 is b0 with more blocks per stage
        lambda: torchvision.models.efficientnet_b0(num_classes=5),
        lambda: torchvision.models.efficientnet_b1(num_classes=5),
    ),
    # other widths too, as paper 002's half-width VGG11 and double-width VGG13
    "vgg-widths": (
        lambda: _vgg([8, "M", 8, "M", 16, 32]),
        lambda: _vgg([8, 16, "M", 16, 16, "M", 32, 16, 32]),
    ),
}


def _probe(count: int = 24) -> torch.Tensor:
    return torch.randn(count, *IN_SHAPE, generator=torch.Generator().manual_seed(1))


def _units(model: nn.Module) -> list[int]:
    return [len(section.units) for section in traced_spec(model, IN_SHAPE).sections]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="mlp", in_shape=(1, 8, 8), hidden=(24, 16, 12)),
        dict(name="vgg_cnn", in_shape=(3, 16, 16), stages=((6,), (8, 8)), fc=(12,)),
        dict(name="resnet20_cifar", in_shape=(3, 16, 16)),
    ],
    ids=["mlp", "vgg", "resnet"],
)
def test_derived_sections_equal_the_declared_ones(kwargs):
    kwargs = dict(kwargs)
    model = create_model(kwargs.pop("name"), num_classes=5, **kwargs)
    derived = [[(u.output, u.width) for u in s.units]
               for s in traced_spec(model, kwargs["in_shape"]).sections]  # fmt: skip
    declared = [[(u.output, u.width) for u in s.units] for s in model.sections()]
    if model.arch["name"].startswith("resnet"):  # the stem opens the first stage's section
        declared[0].insert(0, ("stem.1", 16))
    assert derived == declared


def test_sections_of_torchvision_networks():
    assert _units(torchvision.models.resnet18(num_classes=5)) == [1, 2, 2, 2, 2]
    resnet34 = traced_spec(torchvision.models.resnet34(num_classes=5), IN_SHAPE)
    assert [len(s.units) for s in resnet34.sections] == [1, 3, 4, 6, 3]
    first_block = resnet34.sections[2].units[0]  # downsampling: compared on its main branch
    assert (first_block.output, first_block.residual) == ("layer2.0.bn2", True)
    assert "layer2.0.downsample.0.weight" in first_block.keys
    vgg = _vgg([8, 8, "M", 16, "M", 16, 16, 16])
    assert _units(vgg) == [2, 1, 3, 1]  # three stages, then the hidden linear layer
    assert not any(u.residual for s in traced_spec(vgg, IN_SHAPE).sections for u in s.units)
    # an inverted-residual block that adds its input is one unit; one that does not is a
    # unit per convolution, its squeeze-and-excitation gate in the depthwise one's; the
    # section starts at the strided depthwise convolution
    efficientnet = traced_spec(torchvision.models.efficientnet_b0(num_classes=5), IN_SHAPE)
    stage = [(u.module, u.residual) for u in efficientnet.sections[1].units]
    assert stage == [
        ("features.2.0.block.1.0", False),  # depthwise, stride 2, and the gate
        ("features.2.0.block.3.0", False),  # projection
        ("features.2.1.block.0.0", True),  # a whole residual block
        ("features.3.0.block.0.0", False),  # the next block's expansion, before its stride
    ]


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_clafusion_balances_traced_networks_without_changing_their_function(family):
    build_shallow, build_deep = PAIRS[family]
    shallow, deep = _trained_like(build_shallow(), 0), _trained_like(build_deep(), 1)
    x = _probe()
    # all the weight on the shallower network: the fused one computes its function in the
    # deeper one's architecture
    result = clafusion([shallow, deep], x, OTFusionConfig(weights=[1.0, 0.0]))
    assert (result.base, result.depth_reference) == (0, 1)
    assert result.model.state_dict().keys() == deep.state_dict().keys()
    with torch.no_grad():
        reference = shallow(x)
        torch.testing.assert_close(result.balanced[0](x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.model(x), reference, atol=1e-4, rtol=1e-4)
    shallow_units, deep_units = _units(shallow), _units(deep)
    for section, mapping in zip(result.alignments, result.alignments.values(), strict=True):
        k = int(section.removeprefix("section"))
        assert len(mapping[0]) == shallow_units[k]  # every unit of the shallower one is placed
        assert mapping[0] == sorted(set(mapping[0])) and mapping[0][-1] < deep_units[k]
    evenly = clafusion([shallow, deep], x, OTFusionConfig())  # both count: a new function
    with torch.no_grad():
        assert not torch.allclose(evenly.model(x), reference, atol=1e-3)


def test_clafusion_of_a_traced_network_and_its_permuted_copy_gives_it_back():
    model = _trained_like(PAIRS["resnet"][1]())
    clone = permuted_copy(model, traced_spec(model, IN_SHAPE))
    config = OTFusionConfig(ground_metric="weight", plan="emd")
    fused = clafusion([model, clone], _probe(), config).model
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], tensor, atol=1e-5, rtol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


def test_what_cannot_be_balanced_is_named():
    x = _probe(8)
    wide = _vgg([12, 12, "M", 16])
    wide.features[0] = nn.Conv2d(3, 12, kernel_size=5, padding=2)  # another kernel size
    kernel = (r"^model 0: 'features.0.weight' \[8, 3, 3, 3\] cannot take the place of "
              r"'features.0.weight' \[12, 3, 5, 5\]$")  # fmt: skip
    with pytest.raises(UnsupportedNetwork, match=kernel):
        clafusion([_vgg([8, "M", 16]), wide], x)
    crossed = _vgg([8, 8, "M", 16]), _vgg([8, "M", 16, 16])
    with pytest.raises(UnsupportedNetwork, match=r"no network is the deepest in every section"):
        clafusion(list(crossed), x)
    with pytest.raises(UnsupportedNetwork, match=r"balance='merge'"):
        clafusion([_vgg([8, "M", 16]), _vgg([8, 8, "M", 16])], x, OTFusionConfig(balance="merge"))
    fewer = _vgg([8, "M", 16, "M", 16])
    with pytest.raises(UnsupportedNetwork, match=r"model 1: 4 sections .* model 0 has 3"):
        clafusion([_vgg([8, "M", 16]), fewer], x)


RESIZABLE = {
    "mobilenet": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
    "convnext": lambda: _convnext((1, 2)),
}


@pytest.mark.parametrize("name", sorted(RESIZABLE))
def test_a_traced_network_resized_to_other_widths_runs(name):
    build = RESIZABLE[name]
    model = build().eval()
    spec = traced_spec(model, IN_SHAPE)
    half = {name: max(1, size // 2) for name, size in spec.group_sizes(model).items()}
    smaller = resized(model, spec, half)
    assert spec.group_sizes(smaller) == half  # depthwise convolutions, SE, LayerNorm follow
    with torch.no_grad():
        assert smaller(_probe(2)).shape == (2, 5)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())

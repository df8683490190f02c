"""fusion/models.py: every registered model honours the uniform Classifier interface."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from amalgam.fusion import models
from amalgam.fusion.models import Classifier, create_model, list_models, register_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NUM_CLASSES = 5
BATCH = 4  # > 1: BatchNorm layers need more than one sample in training mode


def _in_shapes(name: str) -> list[tuple[int, int, int]]:
    if name.startswith("resnet"):
        return [(3, 32, 32)]
    return [(1, 8, 8), (1, 28, 28)]


CASES = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name in list_models()
    for shape in _in_shapes(name)
]


def _build(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, in_shape=in_shape, num_classes=NUM_CLASSES)
    x = torch.rand(BATCH, *in_shape, generator=torch.Generator().manual_seed(1))
    return model, x


def test_registry_holds_the_documented_models():
    assert {"mlp", "small_cnn", "resnet8_cifar", "resnet20_cifar"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_shapes_and_uniform_interface(name, in_shape):
    model, x = _build(name, in_shape)
    model.eval()
    assert isinstance(model, Classifier)
    kwargs = {"in_shape": in_shape, "num_classes": NUM_CLASSES}
    assert model.arch == {"name": name, "kwargs": kwargs}
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        head = model.forward_head(features)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert features.shape == (BATCH, model.num_features)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(features).all()
    torch.testing.assert_close(logits, head, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_every_parameter_gets_a_gradient(name, in_shape):
    model, x = _build(name, in_shape)
    model.train()
    target = torch.arange(BATCH) % NUM_CLASSES
    loss = F.cross_entropy(model(x), target)
    assert torch.isfinite(loss)
    loss.backward()

    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    not_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"NaN/inf gradient for {not_finite}"
    total = sum(p.grad.abs().sum() for p in model.parameters())
    assert total > 0


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_input_gradient_flows(name, in_shape):
    # data-free fusion and BN feedback differentiate the teacher with respect to its input
    model, x = _build(name, in_shape)
    model.eval()
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_models())
def test_defaults_build_and_state_dict_reloads(name):
    # every entry point takes in_shape=(C, H, W) and num_classes, with usable defaults
    defaults = inspect.signature(models._REGISTRY[name]).parameters
    in_shape = defaults["in_shape"].default
    torch.manual_seed(0)
    model = create_model(name).eval()
    clone = create_model(name).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.rand(2, *in_shape)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, clone(x))
    assert out.shape == (2, defaults["num_classes"].default)


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    def mlp(in_shape=(1, 8, 8), num_classes=10):  # same name as the built-in entry point
        raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_model(mlp)
    assert models._REGISTRY["mlp"] is not mlp


def test_register_a_new_model(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    def tiny_linear(in_shape=(1, 2, 2), num_classes=3):
        return models.MLP(in_shape, num_classes, hidden=4)

    assert register_model(tiny_linear) is tiny_linear
    assert "tiny_linear" in list_models()
    model = create_model("tiny_linear", num_classes=2)
    assert model.arch == {"name": "tiny_linear", "kwargs": {"num_classes": 2}}
    assert model(torch.rand(3, 1, 2, 2)).shape == (3, 2)
    with pytest.raises(ValueError):
        register_model(tiny_linear)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown architecture 'resnet1000'") as info:
        create_model("resnet1000")
    for name in list_models():
        assert name in str(info.value)

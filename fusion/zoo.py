"""Networks that torchvision and timm build by name: the architectures organizations already
have, as party models and as students.

A name is ``torchvision:<name>``, ``timm:<name>`` or a bare name, looked up in torchvision's
classification models first, then in timm's. Nothing is downloaded: networks start from
random weights, or from a local weights file.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amalgam.fusion.config import first_line
from amalgam.fusion.device import to_model
from amalgam.fusion.models import Classifier

LIBRARIES = ("torchvision", "timm")
MIN_SIDE = 32  # smaller inputs are upsampled: five stride-2 stages need 32 pixels


@functools.cache
def _torchvision_classifiers() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _timm_knows(name: str) -> bool:
    import timm  # imported only when a name is not torchvision's (about 3 s)

    return timm.is_model(name)


def resolve(name: str) -> tuple[str, str] | None:
    """``(library, model name)`` for ``name``, or None when neither library knows it."""
    library, _, model = name.rpartition(":")
    if library and library not in LIBRARIES:
        return None
    if library in ("", "torchvision") and model in _torchvision_classifiers():
        return "torchvision", model
    if library in ("", "timm") and _timm_knows(model):
        return "timm", model
    return None


def build_network(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The library's own network ``name`` with ``num_classes`` outputs, randomly initialised:
    its parameter names are the library's, so an owner's ``state_dict`` loads into it."""
    found = resolve(name)
    if found is None:
        raise ValueError(f"unknown architecture {name!r}: neither torchvision nor timm has it")
    library, model = found
    if library == "torchvision":
        import torchvision

        return torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)
    import timm

    return timm.create_model(model, pretrained=False, num_classes=num_classes, **kwargs)


def _last_linear(network: nn.Module, num_classes: int) -> str:
    """The name of the network's classifier: its last ``nn.Linear`` with ``num_classes``
    outputs."""
    names = [
        name
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_classes
    ]
    if not names:
        raise ValueError(f"found no linear classifier with {num_classes} outputs")
    return names[-1]


def adapt_input(x: Tensor, channels: int | None, side: tuple[int, int]) -> Tensor:
    """(B, C, H, W) images as a library network takes them: one channel repeated to
    ``channels`` (where given), sides resized to ``side``. One call in a traced graph
    (``torch.fx.wrap``): its branches depend on the shape of ``x``."""
    if channels is not None:
        x = x.expand(-1, channels, -1, -1)  # (B, 1, H, W) -> (B, channels, H, W)
    if tuple(x.shape[2:]) != side:
        x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
    return x


torch.fx.wrap("adapt_input")


class LibraryClassifier(Classifier):
    """A torchvision or timm network behind the registry's interface (``forward_features``,
    ``head``, ``num_features``): its classifier becomes ``head``, everything before it
    ``body``. Inputs are adapted to what the network was built for: one channel is repeated
    to three for torchvision (timm takes ``in_chans``), and sides under :data:`MIN_SIDE` are
    upsampled."""

    def __init__(
        self, name: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs: Any
    ) -> None:
        super().__init__()
        library, model = resolve(name) or (None, name)
        channels = in_shape[0]
        if library == "timm":
            self.body = build_network(name, 0, in_chans=channels, **kwargs)  # pooled (B, F)
            # a pre-logits head (MobileNetV3's conv_head) widens what the body returns
            hidden = getattr(self.body, "head_hidden_size", None)
            self.num_features = hidden or self.body.num_features
            self.head = nn.Linear(self.num_features, num_classes)
            self.channels = None
        else:
            if channels not in (1, 3):
                raise ValueError(f"{model} takes 1- or 3-channel images, not {channels}")
            self.body = build_network(name, num_classes, **kwargs)
            classifier = _last_linear(self.body, num_classes)
            self.head = self.body.get_submodule(classifier)
            self.body.set_submodule(classifier, nn.Identity())
            self.num_features = self.head.in_features
            self.channels = 3 if channels == 1 else None
        self.side = tuple(max(MIN_SIDE, s) for s in in_shape[1:])

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_features)."""
        return self.body(adapt_input(x, self.channels, self.side))


def check_forward(
    model: nn.Module, in_shape: tuple[int, ...], num_classes: int
) -> tuple[str, str] | None:
    """A dry forward pass of two zero inputs of shape ``in_shape``: None when ``model``
    answers (2, ``num_classes``) logits, else ``(what, problem)`` with ``what`` the input
    (``"input_shape"``) or the outputs (``"class_names"``) and the problem in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(to_model(model, torch.zeros(2, *in_shape)))
    except Exception as error:  # any failure of the model's own code
        return (
            "input_shape",
            f"a forward pass on inputs of shape {list(in_shape)} failed: {first_line(error)}",
        )
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return "class_names", f"the model answers {shape}, not (batch, classes) logits"
    if out.shape[1] != num_classes:
        return "class_names", f"{num_classes} names for a model with {out.shape[1]} outputs"
    return None

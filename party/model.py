"""Load the owner's private model, in whichever form the owner keeps it.

* a ``torch.export`` program (``.pt2``, ``torch.export.save``): run as its unflattened module,
  so that forward hooks (Activations, Gram, BatchNorm feedback) reach its layers by their
  original names;
* a TorchScript file (``torch.jit.save``);
* a torchvision or timm architecture by name with a local weights file;
* a registered architecture (:func:`amalgam.fusion.models.create_model`) with a weights file.

Every loader's problem is a ``ValueError`` in one line that names the file or field.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from amalgam.fusion.config import first_line
from amalgam.fusion.datafree.bn_loss import batchnorm_layers
from amalgam.fusion.detection.models import DETECTORS, create_detector
from amalgam.fusion.models import create_model, fit_problem, list_models, load_state_dict
from amalgam.fusion.zoo import build_network
from amalgam.party.config import ModelSource
from amalgam.protocol.schemas import Policy


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` while the block runs: the one-line refusal says the rest."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_program(path: str) -> nn.Module:
    """The unflattened module of a ``torch.export`` program with a dynamic batch dimension."""
    try:
        with _quiet("torch.export"):  # its own warnings about a file it cannot read
            program = torch.export.load(path)
    except FileNotFoundError:
        raise ValueError(f"model.program: {path} does not exist") from None
    except Exception as error:  # torch raises several kinds for a file that is not a program
        raise ValueError(
            f"model.program: {path} is not a torch.export program ({first_line(error)})"
        ) from None
    inputs = [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    if len(inputs) != 1:
        raise ValueError(f"model.program: {path} takes {len(inputs)} inputs, not one image batch")
    batch = inputs[0].meta["val"].shape[0]
    if isinstance(batch, int):
        raise ValueError(
            f"model.program: {path} was exported for batches of exactly {batch}; export it "
            "with a dynamic batch dimension (dynamic_shapes with torch.export.Dim)"
        )
    return torch.export.unflatten(program)


def _load_torchscript(path: str) -> nn.Module:
    try:
        with warnings.catch_warnings():  # its deprecation is stated once, in the docs
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
            return torch.jit.load(path, map_location="cpu")
    except ValueError as error:  # torch's message for a missing file
        raise ValueError(f"model.torchscript: {path}: {first_line(error)}") from None
    except RuntimeError as error:
        raise ValueError(
            f"model.torchscript: {path} is not a TorchScript file ({first_line(error)})"
        ) from None


def _load_architecture(source: ModelSource, input_shape: tuple, num_classes: int) -> nn.Module:
    """A registered, torchvision or timm architecture with the owner's state dict."""
    name = source.arch
    kwargs = dict(source.kwargs)
    if name in DETECTORS:
        model = create_detector(name, **kwargs)
    elif name in list_models():
        kwargs.setdefault("in_shape", tuple(input_shape))
        kwargs.setdefault("num_classes", num_classes)
        model = create_model(name, **kwargs)
    else:
        try:
            model = build_network(name, kwargs.pop("num_classes", num_classes), **kwargs)
        except TypeError as error:
            raise ValueError(f"model.kwargs: {first_line(error)}") from None
        except ValueError as error:
            raise ValueError(f"model.arch: {first_line(error)}") from None
    try:
        state = load_state_dict(source.weights)
    except ValueError as error:
        raise ValueError(f"model.weights: {error}") from None
    problem = fit_problem(model, state)
    if problem:
        raise ValueError(f"model.weights: {source.weights} does not fit {name}: {problem}")
    model.load_state_dict(state)
    return model


def load_model(
    source: ModelSource, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10
) -> nn.Module:
    """The owner's model in eval mode with gradients off; ``input_shape`` and ``num_classes``
    (the party's) complete a named architecture's keywords where the owner left them out."""
    if source.program is not None:
        model = _load_program(source.program)
    elif source.torchscript is not None:
        model = _load_torchscript(source.torchscript)
    else:
        model = _load_architecture(source, input_shape, num_classes)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batchnorm_count(model: nn.Module) -> int:
    """The model's BatchNorm layers with running statistics, TorchScript's included (which
    keep the name of their original class)."""
    if isinstance(model, torch.jit.ScriptModule):
        names = [getattr(m, "original_name", "") for m in model.modules()]
        return sum(name.startswith("BatchNorm") for name in names)
    return len(batchnorm_layers(model))


def refuse_unhookable_grants(model: nn.Module, policy: Policy, batchnorm: int) -> None:
    """A TorchScript model cannot run forward hooks: a policy granting what needs them is
    refused at start (``ValueError`` naming the capability), not at every call."""
    if not isinstance(model, torch.jit.ScriptModule):
        return
    advice = "serve the model as a torch.export program (.pt2) to grant it"
    why = "forward hooks are not supported on TorchScript models"
    for capability in ("activations", "gram"):
        if getattr(policy, capability) is not None:
            raise ValueError(
                f"policy.{capability}: a TorchScript model cannot release layer outputs "
                f"({why}); {advice}"
            )
    for capability in ("bn_feedback", "synthesize"):
        if getattr(policy, capability) is not None and batchnorm:
            raise ValueError(
                f"policy.{capability}: the BatchNorm loss of a TorchScript model with "
                f"{batchnorm} BatchNorm layers cannot be computed ({why}); {advice}"
            )

"""Serde at the wire boundary: symmetric ``x_to_proto`` / ``x_from_proto`` pairs.

Nothing past this module sees a protobuf type. Decoding validates before it trusts the bytes:
the dtype is allow-listed, ``len(data) == prod(shape) * itemsize``, the element count is capped,
and inputs that must be finite are checked for NaN/inf. Every failure raises
:class:`CodecError` naming the field, which the servicer maps to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from amalgam.protocol._generated import party_pb2
from amalgam.protocol.schemas import FeatureLayer, Normalization, PartyInfo

# name on the wire -> (numpy dtype, little-endian), torch dtype
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "float64": (np.dtype("<f8"), torch.float64),
    "int64": (np.dtype("<i8"), torch.int64),
    "int32": (np.dtype("<i4"), torch.int32),
    "uint8": (np.dtype("u1"), torch.uint8),
}
_TORCH_TO_NAME = {torch_dtype: name for name, (_, torch_dtype) in _DTYPES.items()}

DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024


class CodecError(ValueError):
    """A message that cannot be decoded; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def tensor_to_proto(tensor: torch.Tensor) -> party_pb2.Tensor:
    """Encode a tensor as raw little-endian C-order bytes."""
    name = _TORCH_TO_NAME.get(tensor.dtype)
    if name is None:
        raise CodecError("tensor.dtype", f"{tensor.dtype} is not an allowed dtype")
    array = tensor.detach().cpu().contiguous().numpy().astype(_DTYPES[name][0], copy=False)
    return party_pb2.Tensor(dtype=name, shape=list(tensor.shape), data=array.tobytes())


def tensor_from_proto(
    message: party_pb2.Tensor,
    field: str = "tensor",
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    require_finite: bool = False,
) -> torch.Tensor:
    """Decode and validate a :class:`party_pb2.Tensor`.

    Raises
    ------
    CodecError
        Unknown dtype, negative dimension, a dimension or too many elements above the cap, byte
        length that does not match the shape, or (with ``require_finite``) a NaN/inf value.
    """
    if message.dtype not in _DTYPES:
        allowed = ", ".join(sorted(_DTYPES))
        raise CodecError(f"{field}.dtype", f"unknown dtype {message.dtype!r} (allowed: {allowed})")
    np_dtype, _ = _DTYPES[message.dtype]
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise CodecError(f"{field}.shape", f"negative dimension in {list(shape)}")
    if any(dim > max_elements for dim in shape):  # e.g. (0, 2**40, 2**40): no elements, no array
        raise CodecError(f"{field}.shape", f"a dimension exceeds the cap of {max_elements}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise CodecError(f"{field}.shape", f"{elements} elements exceed the cap of {max_elements}")
    expected = elements * np_dtype.itemsize
    data = message.data  # each read of a bytes field is a copy of it
    if len(data) != expected:
        raise CodecError(
            f"{field}.data",
            f"{len(data)} bytes, expected {expected} for {message.dtype} {list(shape)}",
        )
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)  # read-only view of the bytes
    tensor = torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))  # writable
    if require_finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CodecError(f"{field}.data", "contains NaN or infinite values")
    return tensor


def party_info_to_proto(info: PartyInfo) -> party_pb2.PartyInfo:
    return party_pb2.PartyInfo(
        name=info.name,
        class_names=info.class_names,
        input_shape=list(info.input_shape),
        normalization=party_pb2.Normalization(
            mean=info.normalization.mean, std=info.normalization.std
        ),
        capabilities=info.capabilities,
        output_form=info.output_form,
        max_batch=info.max_batch,
        batchnorm_layers=info.batchnorm_layers,
        layers=info.layers,
        task=info.task,
        feature_layers=[
            party_pb2.FeatureLayer(name=f.name, shape=list(f.shape)) for f in info.feature_layers
        ],
    )


def party_info_from_proto(message: party_pb2.PartyInfo) -> PartyInfo:
    return PartyInfo(
        name=message.name,
        class_names=list(message.class_names),
        input_shape=tuple(message.input_shape),
        normalization=Normalization(
            mean=list(message.normalization.mean), std=list(message.normalization.std)
        ),
        capabilities=list(message.capabilities),
        output_form=message.output_form,
        max_batch=message.max_batch,
        batchnorm_layers=message.batchnorm_layers,
        layers=list(message.layers),
        task=message.task or "classification",
        feature_layers=[
            FeatureLayer(name=f.name, shape=tuple(f.shape)) for f in message.feature_layers
        ],
    )


def detections_to_proto(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
) -> party_pb2.Detections:
    """A batch's detections: (M, 4) boxes, (M,) scores and labels, (B,) counts per image."""
    return party_pb2.Detections(
        boxes=tensor_to_proto(boxes.float()),
        scores=tensor_to_proto(scores.float()),
        labels=tensor_to_proto(labels.long()),
        counts=tensor_to_proto(counts.long()),
    )


def detections_from_proto(
    message: party_pb2.Detections, batch: int, classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes, scores, labels, counts)`` of :func:`detections_to_proto`, checked: finite
    boxes and scores, ``counts`` of ``batch`` images summing to the rows, labels in
    0..classes-1."""
    field = "detections"
    boxes = tensor_from_proto(message.boxes, f"{field}.boxes", require_finite=True)
    scores = tensor_from_proto(message.scores, f"{field}.scores", require_finite=True)
    labels = tensor_from_proto(message.labels, f"{field}.labels")
    counts = tensor_from_proto(message.counts, f"{field}.counts")
    rows = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise CodecError(f"{field}.boxes", f"shape {list(boxes.shape)}, expected (M, 4)")
    if tuple(scores.shape) != (rows,) or tuple(labels.shape) != (rows,):
        raise CodecError(f"{field}.scores", f"scores and labels must have {rows} rows")
    if tuple(counts.shape) != (batch,) or (counts < 0).any() or int(counts.sum()) != rows:
        raise CodecError(f"{field}.counts", f"must be {batch} counts summing to {rows}")
    if rows and (labels.min() < 0 or labels.max() >= classes):
        raise CodecError(f"{field}.labels", f"outside 0..{classes - 1}")
    return boxes.float(), scores.float(), labels.long(), counts.long()


OBJECTIVE_FIELDS = ("bn", "instance_entropy", "batch_entropy", "adversarial", "temperature")


def objective_to_proto(
    weights: dict[str, float], adversary_logits: torch.Tensor | None = None
) -> party_pb2.GeneratorObjective:
    """A generator objective's weights (``OBJECTIVE_FIELDS``) and optional adversary logits."""
    message = party_pb2.GeneratorObjective(**{k: weights[k] for k in OBJECTIVE_FIELDS})
    if adversary_logits is not None:
        message.adversary_logits.CopyFrom(tensor_to_proto(adversary_logits))
    return message


def objective_from_proto(
    message: party_pb2.GeneratorObjective, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[dict[str, float], torch.Tensor | None]:
    weights = {k: getattr(message, k) for k in OBJECTIVE_FIELDS}
    weights["temperature"] = weights["temperature"] or 1.0
    adversary = None
    if message.HasField("adversary_logits"):
        adversary = tensor_from_proto(
            message.adversary_logits,
            "objective.adversary_logits",
            max_elements=max_elements,
            require_finite=True,
        )
    return weights, adversary


SYNTHESIS_FIELDS = (
    "variant",
    "warmup",
    "iterations",
    "student_steps",
    "batch_size",
    "latent_dim",
    "generator_width",
    "alpha",
    "temperature",
    "lr_generator",
    "lr_student",
    "augment_shift",
    "seed",
    "student_arch",
)
OPTIONAL_SYNTHESIS_FIELDS = ("assistant_steps",)  # absent: the party's default


def synthesis_params_to_proto(params: dict) -> party_pb2.SynthesisParams:
    """A party-side generator's hyper-parameters (``SYNTHESIS_FIELDS`` of a data-free config)."""
    fields = [*SYNTHESIS_FIELDS, *(k for k in OPTIONAL_SYNTHESIS_FIELDS if k in params)]
    return party_pb2.SynthesisParams(**{k: params[k] for k in fields})


def synthesis_params_from_proto(message: party_pb2.SynthesisParams) -> dict:
    params = {k: getattr(message, k) for k in SYNTHESIS_FIELDS}
    params.update(
        {k: getattr(message, k) for k in OPTIONAL_SYNTHESIS_FIELDS if message.HasField(k)}
    )
    return params


def tensors_to_proto(tensors: dict[str, torch.Tensor]) -> dict[str, party_pb2.Tensor]:
    """Named tensors (a ``map<string, Tensor>`` field)."""
    return {name: tensor_to_proto(t) for name, t in tensors.items()}


def tensors_from_proto(
    messages, field: str, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, torch.Tensor]:
    """Decode a ``map<string, Tensor>`` field; errors name ``field[key]``."""
    return {
        name: tensor_from_proto(m, f"{field}[{name}]", max_elements=max_elements)
        for name, m in messages.items()
    }

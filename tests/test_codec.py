"""protocol/codec.py: tensor and PartyInfo serde, and the checks made before trusting bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amalgam.protocol._generated import party_pb2
from amalgam.protocol.codec import (
    CodecError,
    party_info_from_proto,
    party_info_to_proto,
    synthesis_params_from_proto,
    synthesis_params_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    tensors_from_proto,
    tensors_to_proto,
)
from amalgam.protocol.schemas import Normalization, PartyInfo

# wire name -> numpy dtype, the allow-list the codec documents
ALLOWED = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
}
TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


@st.composite
def wire_arrays(draw):
    name = draw(st.sampled_from(sorted(ALLOWED)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = draw(hnp.arrays(ALLOWED[name], shape))  # floats include NaN, inf and -0.0
    return name, array


@settings(max_examples=200, deadline=None)
@given(wire_arrays())
def test_tensor_round_trip_is_bit_exact(case):
    name, array = case
    tensor = torch.from_numpy(array.copy())
    message = tensor_to_proto(tensor)

    assert message.dtype == name
    assert list(message.shape) == list(array.shape)
    assert len(message.data) == math.prod(array.shape) * array.itemsize

    decoded = tensor_from_proto(message)
    assert decoded.dtype == TORCH[name]
    assert tuple(decoded.shape) == array.shape
    # compare raw bytes so NaN payloads and signed zeros count too
    assert decoded.numpy().tobytes() == array.tobytes()


def test_round_trip_survives_serialization_and_non_contiguous_input():
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(0, 2)  # (4, 3, 2)
    assert not tensor.is_contiguous()
    wire = tensor_to_proto(tensor).SerializeToString()
    decoded = tensor_from_proto(party_pb2.Tensor.FromString(wire))
    assert torch.equal(decoded, tensor)


def test_wire_bytes_are_little_endian_c_order():
    message = tensor_to_proto(torch.tensor([[1, 2], [3, 258]], dtype=torch.int32))
    assert message.data == np.array([1, 2, 3, 258], dtype="<i4").tobytes()


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.int16, torch.bfloat16])
def test_encoding_a_disallowed_dtype_raises(dtype):
    with pytest.raises(CodecError) as info:
        tensor_to_proto(torch.zeros(2, dtype=dtype))
    assert info.value.field == "tensor.dtype"


def _message(dtype="float32", shape=(2, 3), data=None) -> party_pb2.Tensor:
    if data is None:
        data = bytes(math.prod(shape) * np.dtype(ALLOWED.get(dtype, np.float32)).itemsize)
    return party_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize("dtype", ["float128", "bool", "", "FLOAT32", "object"])
def test_unknown_dtype_names_the_dtype_field(dtype):
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(dtype=dtype, data=b""))
    assert info.value.field == "tensor.dtype"
    assert "float32" in str(info.value)  # the message lists what is allowed


def test_field_prefix_is_the_callers():
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(dtype="str"), "inputs")
    assert info.value.field == "inputs.dtype"
    assert str(info.value).startswith("inputs.dtype: ")


@pytest.mark.parametrize("delta", [-1, 1, -4, 4])
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_byte_length_must_match_shape(name, delta):
    itemsize = np.dtype(ALLOWED[name]).itemsize
    length = 6 * itemsize + delta
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(dtype=name, shape=(2, 3), data=bytes(length)), "inputs")
    assert info.value.field == "inputs.data"
    assert str(6 * itemsize) in str(info.value)


def test_data_for_a_zero_size_shape_must_be_empty():
    assert tensor_from_proto(_message(shape=(0, 5), data=b"")).shape == (0, 5)
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(shape=(0, 5), data=bytes(4)))
    assert info.value.field == "tensor.data"


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (-1, -1), (0, -2)])
def test_negative_dimension_is_rejected(shape):
    # (-1, -1) has a positive product, so the sign check must not rely on prod(shape)
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(shape=shape, data=bytes(4)))
    assert info.value.field == "tensor.shape"
    assert "negative" in str(info.value)


def test_element_cap():
    at_cap = _message(shape=(4, 25))
    assert tensor_from_proto(at_cap, max_elements=100).shape == (4, 25)
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(shape=(101,)), max_elements=100)
    assert info.value.field == "tensor.shape"
    assert "100" in str(info.value)


def test_element_cap_is_checked_before_allocating():
    # 2**62 elements would never fit in memory; the decoder must refuse from the shape alone
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(shape=(2**31, 2**31), data=b""))
    assert info.value.field == "tensor.shape"


def test_an_empty_tensor_with_huge_dimensions_is_refused_by_its_shape():
    # no element at all, but numpy cannot even describe an array of this shape
    with pytest.raises(CodecError) as info:
        tensor_from_proto(_message(shape=(0, 2**40, 2**40), data=b""))
    assert info.value.field == "tensor.shape"
    assert tensor_from_proto(_message(shape=(0, 8), data=b"")).shape == (0, 8)


@pytest.mark.parametrize("name", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_require_finite(name, bad):
    values = np.array([0.0, 1.0, bad], dtype=ALLOWED[name])
    message = _message(dtype=name, shape=(3,), data=values.tobytes())

    lenient = tensor_from_proto(message)  # by default, non-finite values pass through
    assert lenient.numpy().tobytes() == values.tobytes()

    with pytest.raises(CodecError) as info:
        tensor_from_proto(message, "inputs", require_finite=True)
    assert info.value.field == "inputs.data"


def test_require_finite_accepts_finite_and_integer_tensors():
    floats = tensor_to_proto(torch.tensor([0.0, -1e30, 1e30]))
    assert torch.isfinite(tensor_from_proto(floats, require_finite=True)).all()
    ints = tensor_to_proto(torch.tensor([0, 255], dtype=torch.uint8))
    assert tensor_from_proto(ints, require_finite=True).tolist() == [0, 255]


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


# --- PartyInfo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "info",
    [
        PartyInfo(name="minimal", class_names=["only"], input_shape=(1, 8, 8)),
        PartyInfo(
            name="hospital-a",
            class_names=["cat", "dog", "émeu"],
            input_shape=(3, 32, 32),
            # float32-exact values: the wire carries normalization as proto `float`
            normalization=Normalization(mean=[0.5, 0.25, 0.125], std=[0.5, 2.0, 0.75]),
            capabilities=["predict", "gram", "weights"],
            output_form="topk",
            max_batch=512,
            layers=["body.1", "head"],
        ),
    ],
)
def test_party_info_round_trip(info):
    wire = party_info_to_proto(info).SerializeToString()
    back = party_info_from_proto(party_pb2.PartyInfo.FromString(wire))
    assert back == info
    assert isinstance(back.input_shape, tuple)


def test_party_info_round_trip_keeps_normalization_exactly():
    info = PartyInfo(
        name="mnist",
        class_names=["0", "1"],
        input_shape=(1, 28, 28),
        normalization=Normalization(mean=[0.1307], std=[0.3081]),
    )
    assert party_info_from_proto(party_info_to_proto(info)) == info


def test_named_tensors_round_trip_and_errors_name_the_key():
    tensors = {"body.1": torch.randn(3, 4), "stages.0.bn": torch.randn(3, 2, 2, 2).half()}
    response = party_pb2.LayersResponse(outputs=tensors_to_proto(tensors))
    back = tensors_from_proto(
        party_pb2.LayersResponse.FromString(response.SerializeToString()).outputs, "outputs"
    )
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    response.outputs["bad"].dtype = "complex64"
    with pytest.raises(CodecError, match=r"outputs\[bad\]"):
        tensors_from_proto(response.outputs, "outputs")


def test_synthesis_params_round_trip_and_an_absent_assistant_steps_leaves_the_default():
    from amalgam.fusion.datafree.party_side import SynthesisParams

    params = SynthesisParams(variant="dfmf", assistant_steps=3, student_arch="mlp").model_dump()
    wire = party_pb2.SynthesisParams.FromString(
        synthesis_params_to_proto(params).SerializeToString()
    )
    decoded = synthesis_params_from_proto(wire)
    assert decoded["assistant_steps"] == 3 and decoded["student_arch"] == "mlp"
    # a client built from an earlier party.proto does not send the field: the party's default
    wire.ClearField("assistant_steps")
    decoded = synthesis_params_from_proto(wire)
    assert "assistant_steps" not in decoded
    assert SynthesisParams(**decoded).assistant_steps == SynthesisParams().assistant_steps

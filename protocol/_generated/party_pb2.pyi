from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class PartyInfo(_message.Message):
    __slots__ = ("name", "class_names", "input_shape", "normalization", "capabilities", "output_form", "max_batch", "batchnorm_layers", "layers", "task", "feature_layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORM_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCHNORM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    normalization: Normalization
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    output_form: str
    max_batch: int
    batchnorm_layers: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    task: str
    feature_layers: _containers.RepeatedCompositeFieldContainer[FeatureLayer]
    def __init__(self, name: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., output_form: _Optional[str] = ..., max_batch: _Optional[int] = ..., batchnorm_layers: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., feature_layers: _Optional[_Iterable[_Union[FeatureLayer, _Mapping]]] = ...) -> None: ...

class FeatureLayer(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("request_id", "info")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    info: PartyInfo
    def __init__(self, request_id: _Optional[str] = ..., info: _Optional[_Union[PartyInfo, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("request_id", "inputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: Tensor
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "output_form", "detections")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORM_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: Tensor
    output_form: str
    detections: Detections
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., output_form: _Optional[str] = ..., detections: _Optional[_Union[Detections, _Mapping]] = ...) -> None: ...

class Detections(_message.Message):
    __slots__ = ("boxes", "scores", "labels", "counts")
    BOXES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    counts: Tensor
    def __init__(self, boxes: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., counts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GeneratorObjective(_message.Message):
    __slots__ = ("bn", "instance_entropy", "batch_entropy", "adversarial", "adversary_logits", "temperature")
    BN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    BATCH_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    ADVERSARY_LOGITS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    bn: float
    instance_entropy: float
    batch_entropy: float
    adversarial: float
    adversary_logits: Tensor
    temperature: float
    def __init__(self, bn: _Optional[float] = ..., instance_entropy: _Optional[float] = ..., batch_entropy: _Optional[float] = ..., adversarial: _Optional[float] = ..., adversary_logits: _Optional[_Union[Tensor, _Mapping]] = ..., temperature: _Optional[float] = ...) -> None: ...

class BatchNormFeedbackRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "grad_logits", "objective", "half")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGITS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    HALF_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: Tensor
    grad_logits: Tensor
    objective: GeneratorObjective
    half: bool
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., grad_logits: _Optional[_Union[Tensor, _Mapping]] = ..., objective: _Optional[_Union[GeneratorObjective, _Mapping]] = ..., half: _Optional[bool] = ...) -> None: ...

class BatchNormFeedbackResponse(_message.Message):
    __slots__ = ("request_id", "logits", "losses", "input_grad")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    logits: Tensor
    losses: _containers.ScalarMap[str, float]
    input_grad: Tensor
    def __init__(self, request_id: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., losses: _Optional[_Mapping[str, float]] = ..., input_grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SynthesisParams(_message.Message):
    __slots__ = ("variant", "warmup", "iterations", "student_steps", "batch_size", "latent_dim", "generator_width", "alpha", "temperature", "lr_generator", "lr_student", "augment_shift", "seed", "student_arch", "assistant_steps")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LR_GENERATOR_FIELD_NUMBER: _ClassVar[int]
    LR_STUDENT_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_SHIFT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ARCH_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_STEPS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    warmup: int
    iterations: int
    student_steps: int
    batch_size: int
    latent_dim: int
    generator_width: int
    alpha: float
    temperature: float
    lr_generator: float
    lr_student: float
    augment_shift: int
    seed: int
    student_arch: str
    assistant_steps: int
    def __init__(self, variant: _Optional[str] = ..., warmup: _Optional[int] = ..., iterations: _Optional[int] = ..., student_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., latent_dim: _Optional[int] = ..., generator_width: _Optional[int] = ..., alpha: _Optional[float] = ..., temperature: _Optional[float] = ..., lr_generator: _Optional[float] = ..., lr_student: _Optional[float] = ..., augment_shift: _Optional[int] = ..., seed: _Optional[int] = ..., student_arch: _Optional[str] = ..., assistant_steps: _Optional[int] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("request_id", "session", "params", "steps", "samples", "half")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HALF_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session: str
    params: SynthesisParams
    steps: int
    samples: int
    half: bool
    def __init__(self, request_id: _Optional[str] = ..., session: _Optional[str] = ..., params: _Optional[_Union[SynthesisParams, _Mapping]] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., half: _Optional[bool] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("request_id", "samples", "losses", "steps_done")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    samples: Tensor
    losses: _containers.ScalarMap[str, float]
    steps_done: int
    def __init__(self, request_id: _Optional[str] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., losses: _Optional[_Mapping[str, float]] = ..., steps_done: _Optional[int] = ...) -> None: ...

class LayersRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "layers", "half")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HALF_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: Tensor
    layers: _containers.RepeatedScalarFieldContainer[str]
    half: bool
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., half: _Optional[bool] = ...) -> None: ...

class LayersResponse(_message.Message):
    __slots__ = ("request_id", "outputs")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: _containers.MessageMap[str, Tensor]
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class ExportWeightsRequest(_message.Message):
    __slots__ = ("request_id", "chunk_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("request_id", "architecture", "total_bytes", "sha256", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    architecture: str
    total_bytes: int
    sha256: str
    data: bytes
    def __init__(self, request_id: _Optional[str] = ..., architecture: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

"""``RemoteTeacher``: a :class:`amalgam.fusion.teacher.Teacher` that is a gRPC client of a party
agent.

Every call carries a deadline; large batches are split on the client so that no message
exceeds the limit or the party's ``max_batch``. Only idempotent calls are retried: on
UNAVAILABLE with exponential back-off (at most 5 attempts by default), and on DEADLINE_EXCEEDED
twice, each with double the deadline, for a party that is merely slow. A party's
refusals come back as the same domain errors an in-process teacher raises
(:mod:`amalgam.protocol.errors`); predictions that are not what the party advertised (wrong shape,
NaN or infinite values) raise :class:`MalformedResponse` and are never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from typing import TypeVar

import grpc
import torch
from google.protobuf.message import Message
from torch import Tensor

from amalgam.fusion.teacher import (
    Detections,
    Feedback,
    GeneratorObjective,
    Synthesis,
    TeacherInfo,
    Weights,
    concat_chunks,
    split_chunks,
)
from amalgam.protocol import AUTHORIZATION_METADATA_KEY, CALLER_METADATA_KEY
from amalgam.protocol._generated import party_pb2, party_pb2_grpc
from amalgam.protocol.codec import (
    CodecError,
    detections_from_proto,
    objective_to_proto,
    party_info_from_proto,
    synthesis_params_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    tensors_from_proto,
)
from amalgam.protocol.errors import error_from_status

SYNTHESIZE_DEADLINE_S = 900.0
SLOW_RETRIES = 2  # tries of an idempotent call after DEADLINE_EXCEEDED, each deadline doubled
WEIGHTS_DEADLINE_S = 120.0


class PartyUnavailable(ConnectionError):
    """The party could not be reached within its deadline and retries."""


class MalformedResponse(RuntimeError):
    """The party answered with data that cannot be what it advertised, or failed inside its
    agent (INTERNAL); quarantine it."""


class PartyCallError(RuntimeError):
    """The party answered with an error status; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class CallStats:
    calls: int = 0  # party calls, each checked, charged and audited by the agent
    messages: int = 0  # transport messages that carried them (Flower packs several in one)
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class RemoteTeacher:
    """Client of one party agent.

    Parameters
    ----------
    name : the party's name in the job (used in every error message).
    address : ``host:port``.
    deadline_s : deadline of each call.
    caller : the identity sent as ``x-amalgam-caller`` metadata (a party without TLS reads
        it; with TLS the certificate in ``credentials`` is the identity).
    max_message_mb : the client's message limit; batches are split to stay under it.
    retries : attempts after the first one, on UNAVAILABLE only.
    credentials : TLS, see :func:`amalgam.protocol.tls.channel_credentials`; None: plaintext.
    token : a bearer token sent with every call, for parties that require one.
    half : the capabilities whose tensors travel as float16 both ways (halves the bytes):
        ``bn_feedback``, ``synthesize``, ``activations``, ``gram``.
    stub : instead of a gRPC channel to ``address``, any object whose attributes ``Describe``,
        ``Predict``, ... are called like a gRPC stub's methods and raise ``grpc.RpcError``
        (:class:`amalgam.server.flower.FlowerStub` carries the calls over a Flower Grid).
    info : the party's Describe answer where the caller has it already (one message less
        over Flower); ``None``: asked on first use.

    Attributes
    ----------
    request_scope : what request ids of Predict, Activations and Gram are derived from with
        the request's content (the job runner sets it to the job id): the party answers a
        chunk asked again within the scope from its cache, without charging twice.
    """

    request_scope: str = ""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        deadline_s: float = 30.0,
        caller: str = "coordinator",
        max_message_mb: int = 64,
        retries: int = 4,
        backoff_s: float = 0.2,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        half: Collection[str] = (),
        stub=None,
        info: TeacherInfo | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.deadline_s = deadline_s
        self.retries = retries
        self.half = frozenset(half)
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        self._channel = None
        if stub is not None:  # another transport with the stub's call signature (Flower)
            self._stub = stub
        else:
            if credentials is None:
                self._channel = grpc.insecure_channel(address, options=options)
            else:
                self._channel = grpc.secure_channel(address, credentials, options=options)
            self._stub = party_pb2_grpc.PartyServiceStub(self._channel)
        self._metadata = ((CALLER_METADATA_KEY, caller),)
        if token is not None:
            self._metadata += ((AUTHORIZATION_METADATA_KEY, f"Bearer {token}"),)
        self._info = info
        self._lock = threading.Lock()
        self.stats = CallStats()

    def _call(
        self,
        method: str,
        request,
        retry: bool = True,
        deadline_s: float | None = None,
        stream: bool = False,
        many: bool = False,
    ):
        """One RPC; an idempotent one (``retry``) is tried again on UNAVAILABLE, with
        exponential back-off, and, where the party is merely slow, on DEADLINE_EXCEEDED with
        twice the deadline (:data:`SLOW_RETRIES` times): the request is the same, so the party
        answers what it answered already from its replay cache, uncharged. ``stream``: a
        server-streaming RPC whose messages are collected into a list; ``many``: ``request``
        is a list of requests that the stub's ``call_many`` carries in one message (each its
        own call, with its own deadline), answered by the list of responses."""
        if many:
            rpc = functools.partial(self._stub.call_many, method)
        else:
            rpc = getattr(self._stub, method)
        retries, slow_retries = (self.retries, SLOW_RETRIES) if retry else (0, 0)
        deadline_s = deadline_s or self.deadline_s
        attempt = slow = 0
        while True:
            started = time.perf_counter()
            try:
                response = rpc(request, timeout=deadline_s, metadata=self._metadata)
                if stream:
                    response = list(response)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < retries:
                    time.sleep(self.backoff_s * 2**attempt)
                    attempt += 1
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and slow < slow_retries:
                    deadline_s, slow = 2 * deadline_s, slow + 1
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise PartyUnavailable(
                        f"party {self.name} at {self.address} is unreachable "
                        f"({code.name} after {attempt + slow + 1} attempts, last deadline "
                        f"{deadline_s:g}s)"
                    ) from None
                if code == grpc.StatusCode.INTERNAL:  # the agent failed: a broken party
                    raise MalformedResponse(
                        f"party {self.name} at {self.address}: {method} failed inside the "
                        f"agent: {error.details()}"
                    ) from None
                domain_error = error_from_status(code, error.details())
                if domain_error is not None:
                    raise domain_error from None
                raise PartyCallError(
                    f"party {self.name} at {self.address}: {method} failed: "
                    f"{code.name}: {error.details()}",
                    code,
                ) from None
            with self._lock:
                sent = request if many else [request]
                self.stats.calls += len(sent)
                self.stats.messages += 1
                self.stats.bytes_sent += sum(m.ByteSize() for m in sent)
                received = response if stream or many else [response]
                self.stats.bytes_received += sum(m.ByteSize() for m in received)
                self.stats.seconds += time.perf_counter() - started
            return response

    @property
    def info(self) -> TeacherInfo:
        if self._info is None:
            response = self._call("Describe", party_pb2.DescribeRequest(request_id=_request_id()))
            self._info = TeacherInfo.from_dict(party_info_from_proto(response.info).model_dump())
        return self._info

    def chunk_size(self, x: Tensor) -> int:
        """Samples of ``x`` per call: within the party's max_batch and, with room for the
        reply and framing, within the message limit (the job store records answers in the
        same chunks)."""
        per_sample = max(1, x[0].numel() * x.element_size())
        by_bytes = max(1, (self.max_message_bytes // 2) // per_sample)
        max_batch = self.info.max_batch or by_bytes
        return min(max_batch, by_bytes)

    def _exchange(self, method: str, requests: list) -> Iterator[tuple[int, Message]]:
        """``(index, response)`` of each request, in order, each its own party call: one
        message per call over gRPC; over a stub that packs (``call_many``, Flower), as many
        calls in one message as fit within the message limit."""
        if not hasattr(self._stub, "call_many"):
            for index, request in enumerate(requests):
                yield index, self._call(method, request)
            return
        groups: list[list[int]] = []
        room = 0
        for index, request in enumerate(requests):
            size = request.ByteSize()
            if not groups or size > room:
                groups.append([])
                room = self.max_message_bytes
            groups[-1].append(index)
            room -= size
        for group in groups:
            responses = self._call(method, [requests[i] for i in group], many=True)
            yield from zip(group, responses)

    def predict_chunks(
        self, parts: list[Tensor], on_answer: Callable[[int, Tensor], None] | None = None
    ) -> list[Tensor]:
        """The party's released predictions on each of ``parts`` ((B, C, H, W), each within
        :meth:`chunk_size`), one party call each, carried in as few messages as the transport
        allows (:meth:`_exchange`); ``on_answer(index, predictions)`` as each arrives."""
        requests = [
            _by_content(party_pb2.PredictRequest(inputs=tensor_to_proto(part.contiguous())),
                        self.request_scope)
            for part in parts
        ]  # fmt: skip
        answers: list[Tensor] = []
        for index, response in self._exchange("Predict", requests):
            out = self._checked_predictions(response, len(parts[index]))
            with self._lock:
                self.stats.samples += len(parts[index])
            if on_answer is not None:
                on_answer(index, out)
            answers.append(out)
        return answers

    def _checked_predictions(self, response, batch: int) -> Tensor:
        """(B, K) finite values, or (B,) labels in 0..K-1 for ``label``; anything else is
        quarantined."""
        classes = len(self.info.class_names)
        try:
            out = tensor_from_proto(response.outputs, "outputs", require_finite=True)
        except CodecError as error:
            raise MalformedResponse(f"party {self.name}: Predict answered {error}") from None
        labels = response.output_form == "label"
        expected = (batch,) if labels else (batch, classes)
        if tuple(out.shape) != expected:
            raise MalformedResponse(
                f"party {self.name}: Predict answered shape {list(out.shape)}, expected "
                f"{list(expected)}"
            )
        if labels and len(out) and (out.min() < 0 or out.max() >= classes):
            raise MalformedResponse(f"party {self.name}: Predict answered labels outside 0..K-1")
        return out

    def predict(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the party's released predictions, in as many calls as needed."""
        return torch.cat(self.predict_chunks(split_chunks(x, self.chunk_size(x))))

    def detect(self, x: Tensor) -> list[Detections]:
        """A detection party's boxes on (B, C, H, W) inputs, one entry per image, in as many
        calls as needed; rows that do not add up, labels outside the party's categories or
        non-finite boxes are quarantined as malformed."""
        found: list[Detections] = []
        chunk = self.chunk_size(x)
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk].contiguous()
            request = _by_content(
                party_pb2.PredictRequest(inputs=tensor_to_proto(part)), self.request_scope
            )
            response = self._call("Predict", request)
            if response.output_form != "detections":
                raise MalformedResponse(
                    f"party {self.name}: Predict answered {response.output_form!r}, expected "
                    "detections"
                )
            try:
                rows = detections_from_proto(
                    response.detections, len(part), len(self.info.class_names)
                )
            except CodecError as error:
                raise MalformedResponse(f"party {self.name}: Predict answered {error}") from None
            found += Detections.split(*rows)
            with self._lock:
                self.stats.samples += len(part)
        return found

    def bn_feedback(
        self,
        x: Tensor,
        objective: GeneratorObjective,
        adversary_logits: Tensor | None = None,
        grad_logits: Tensor | None = None,
    ) -> Feedback:
        """One round trip per generator step: the batch is never split (its BN statistics are
        one sample). Where ``half`` holds ``bn_feedback``, tensors travel as float16 both
        ways and come back as float32."""
        half = "bn_feedback" in self.half
        wire = torch.float16 if half else x.dtype

        def encode(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(wire)

        request = party_pb2.BatchNormFeedbackRequest(
            request_id=_request_id(),
            inputs=tensor_to_proto(encode(x)),
            objective=objective_to_proto(asdict(objective), encode(adversary_logits)),
            half=half,
        )
        if grad_logits is not None:
            request.grad_logits.CopyFrom(tensor_to_proto(encode(grad_logits)))
        response = self._call("BatchNormFeedback", request)
        logits = tensor_from_proto(response.logits, "logits")
        input_grad = tensor_from_proto(response.input_grad, "input_grad")
        if half:
            logits, input_grad = logits.float(), input_grad.float()
        with self._lock:
            self.stats.samples += len(x)
        return Feedback(logits, dict(response.losses), input_grad)

    def synthesize(self, params: dict, session: str, steps: int, samples: int) -> Synthesis:
        """One call advances the party's own generator by ``steps`` and returns ``samples``
        images. Not retried: a repeated call would advance the generator twice."""
        request = party_pb2.SynthesizeRequest(
            request_id=_request_id(),
            session=session,
            params=synthesis_params_to_proto(params),
            steps=steps,
            samples=samples,
            half="synthesize" in self.half,
        )
        # generator training takes longer than a prediction: allow minutes, not seconds
        deadline = max(self.deadline_s, SYNTHESIZE_DEADLINE_S)
        response = self._call("Synthesize", request, retry=False, deadline_s=deadline)
        images = tensor_from_proto(response.samples, "samples").float()
        return Synthesis(images, dict(response.losses), response.steps_done)

    def _layers_once(self, x: Tensor, layers: list[str], gram: bool) -> dict[str, Tensor]:
        half = ("gram" if gram else "activations") in self.half
        request = _by_content(
            party_pb2.LayersRequest(inputs=tensor_to_proto(x), layers=layers, half=half),
            self.request_scope,
        )
        response = self._call("Gram" if gram else "Activations", request)
        out = tensors_from_proto(response.outputs, "outputs")
        with self._lock:
            self.stats.samples += len(x)
        return {name: t.float() for name, t in out.items()} if half else out

    def activations(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """Outputs of the named layers on (t, C, H, W), in as many calls as needed."""
        return concat_chunks(
            lambda chunk: self._layers_once(chunk, layers, gram=False),
            x.contiguous(),
            self.chunk_size(x),
        )

    def gram(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """Centered (t, t) Gram matrices of the named layers; one call, since a Gram matrix
        spans the whole batch (t must fit the party's ``max_batch``)."""
        limit = self.chunk_size(x)
        if len(x) > limit:
            raise ValueError(
                f"party {self.name}: a Gram matrix of {len(x)} samples exceeds one call's limit "
                f"of {limit}; use a smaller probe"
            )
        return self._layers_once(x.contiguous(), layers, gram=True)

    def weights(self) -> Weights:
        """The architecture and the state dict, streamed as safetensors bytes and checked
        against the announced length and SHA-256. Idempotent, so retried like Predict."""
        request = party_pb2.ExportWeightsRequest(request_id=_request_id())
        deadline = max(self.deadline_s, WEIGHTS_DEADLINE_S)
        chunks = self._call("ExportWeights", request, deadline_s=deadline, stream=True)
        if not chunks:
            raise PartyCallError(
                f"party {self.name}: ExportWeights sent nothing", grpc.StatusCode.DATA_LOSS
            )
        head = chunks[0]
        payload = b"".join(c.data for c in chunks)
        if len(payload) != head.total_bytes or hashlib.sha256(payload).hexdigest() != head.sha256:
            raise PartyCallError(
                f"party {self.name}: exported weights arrived damaged ({len(payload)} of "
                f"{head.total_bytes} bytes, or a SHA-256 mismatch)",
                grpc.StatusCode.DATA_LOSS,
            )
        return Weights.from_safetensors(json.loads(head.architecture), payload)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


M = TypeVar("M", bound=Message)


def _request_id() -> str:
    return uuid.uuid4().hex


def _by_content(request: M, scope: str) -> M:
    """``request`` with an id derived from ``scope`` (the job) and its content: a retry, or the
    same chunk asked again by the resumed job, sends the same bytes, which the party answers
    again without charging (its answer cache); another job is charged anew. The id also names
    the chunk in both sides' logs."""
    digest = hashlib.sha256(scope.encode())
    digest.update(request.SerializeToString(deterministic=True))
    request.request_id = digest.hexdigest()
    return request

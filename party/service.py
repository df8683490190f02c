"""The gRPC face of a party: a thin servicer over :class:`amalgam.party.handler.PartyHandler`.

Authenticate -> admit -> authorize -> decode -> handler -> encode, every call audited; domain
errors map to status codes: a bad tensor or request -> INVALID_ARGUMENT, a denied capability or
caller -> PERMISSION_DENIED, an exhausted budget or rate, a request too large or too many calls
in flight -> RESOURCE_EXHAUSTED, a missing or unknown bearer token -> UNAUTHENTICATED; INTERNAL
only for a failure of the agent itself.
The server also serves the standard ``grpc.health.v1`` service, which turns NOT_SERVING as
soon as the server starts to stop.
"""

from __future__ import annotations

import hashlib
import hmac
import signal
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import torch
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amalgam.party.allocator import keep_freed_memory
from amalgam.party.config import PartyConfig
from amalgam.party.endpoint import PartyEndpoint
from amalgam.party.handler import PartyHandler
from amalgam.protocol import AUTHORIZATION_METADATA_KEY, CALLER_METADATA_KEY
from amalgam.protocol.errors import (
    BudgetExceeded,
    PartyError,
    Unauthenticated,
    bounded,
    status_code,
)
from amalgam.protocol.rpcs import REQUESTS, RESPONSES, SERVICE_NAME, STREAMING
from amalgam.protocol.tls import peer_identity, server_credentials, token_digest

REFUSAL_WORKERS = 8  # threads beyond max_concurrent_rpcs that answer the refusals
# answers that a repeated request (a retry, a resumed job) gets again without being charged
REPLAYABLE = {"Predict", "BatchNormFeedback", "Activations", "Gram"}
REPLAY_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    response: Message
    samples: int
    size: int  # bytes


class AnswerCache:
    """The most recent answers by (caller, method, SHA-256 of the request bytes), within
    ``capacity`` bytes: the oldest go first. A request whose twin is still being answered (a
    retry after the caller's deadline, while the agent is merely slow) waits for that answer
    rather than being answered, and charged, a second time."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size = capacity, 0
        self._answers: OrderedDict[tuple, Answer] = OrderedDict()
        self._in_flight: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    def claim(self, key: tuple) -> Answer | None:
        """The answer to ``key`` if there is one (after waiting for a twin in flight), else
        ``None``, and the caller must answer it and then :meth:`put` or :meth:`release`."""
        while True:
            with self._lock:
                answer = self._answers.get(key)
                if answer is not None:
                    self._answers.move_to_end(key)
                    return answer
                twin = self._in_flight.get(key)
                if twin is None:
                    self._in_flight[key] = threading.Event()
                    return None
            twin.wait()  # answered (then replayed) or failed (then answered here)

    def release(self, key: tuple) -> None:
        """The claimed ``key`` was not answered: a waiting twin answers it itself."""
        with self._lock:
            event = self._in_flight.pop(key, None)
        if event is not None:
            event.set()

    def put(self, key: tuple, answer: Answer) -> None:
        """Keep the answer to the claimed ``key`` and wake its waiting twins."""
        with self._lock:
            if answer.size <= self.capacity and key not in self._answers:
                self._answers[key] = answer
                self.size += answer.size
                while self.size > self.capacity:
                    _, oldest = self._answers.popitem(last=False)
                    self.size -= oldest.size
        self.release(key)


@dataclass(frozen=True)
class Authenticator:
    """Who is calling. With TLS, the verified client certificate's common name; without it,
    the identity the caller names in ``x-amalgam-caller`` metadata (trusted only on a private
    loopback, hence ``--insecure``). With ``tokens`` (identity -> :func:`token_digest`), a
    call must also carry ``authorization: Bearer <token>`` of that identity, compared in
    constant time."""

    tls: bool = False
    tokens: dict[str, str] = field(default_factory=dict)

    def identity(self, context: grpc.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata())
        if self.tls:
            claimed = peer_identity(context)
            if claimed is None:  # require_client_auth makes this unreachable; fail closed
                raise Unauthenticated("no verified client certificate")
        else:
            claimed = metadata.get(CALLER_METADATA_KEY, "anonymous")
        if not self.tokens:
            return claimed
        scheme, _, token = metadata.get(AUTHORIZATION_METADATA_KEY, "").partition(" ")
        presented = token_digest(token) if scheme.lower() == "bearer" and token else ""
        expected = self.tokens.get(claimed, "")
        # compare against a digest of the same length even for an unknown identity
        if not hmac.compare_digest(presented.encode(), (expected or token_digest("")).encode()):
            raise Unauthenticated(f"caller {claimed!r}: missing or unknown bearer token")
        if not expected:
            raise Unauthenticated(f"caller {claimed!r}: no token is registered for it")
        return claimed


class PartyServicer:
    """The PartyService over raw request bytes, so that nothing is parsed before it is
    allowed: authenticate the caller, admit it, check that the policy lets it use the
    capability behind the method, check the size, and only then decode. Every call is
    audited, whatever stops it: unauthenticated, not admitted, not granted, too large, more
    calls in flight than ``max_concurrent`` (RESOURCE_EXHAUSTED, retry later), not a message
    of the method's type (INVALID_ARGUMENT), or a failure of the agent itself (INTERNAL with a
    short message; the traceback goes to the agent's log, stderr)."""

    def __init__(
        self,
        handler: PartyHandler,
        max_elements: int,
        authenticator: Authenticator,
        max_request_bytes: int,
        max_concurrent: int | None = None,
    ) -> None:
        self.handler = handler
        self.endpoint = PartyEndpoint(handler, max_elements)
        self.authenticator = authenticator
        self.max_request_bytes = max_request_bytes
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self.answers = AnswerCache(REPLAY_CACHE_BYTES)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of the service, taking the request as bytes."""
        table = {}
        for method, response in RESPONSES.items():
            serialize = response.SerializeToString
            if method in STREAMING:
                table[method] = grpc.unary_stream_rpc_method_handler(
                    lambda raw, context, m=method: iter(self._call(m, raw, context)),
                    response_serializer=serialize,
                )
            else:
                table[method] = grpc.unary_unary_rpc_method_handler(
                    lambda raw, context, m=method: self._call(m, raw, context),
                    response_serializer=serialize,
                )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, table)

    def _call(self, method: str, raw: bytes, context: grpc.ServicerContext):
        if self._slots is not None and not self._slots.acquire(blocking=False):
            error = BudgetExceeded(
                f"party {self.handler.name}: {self.max_concurrent} calls in flight already; "
                "retry shortly"
            )
            self._refuse(context, method, "concurrency", error)
        try:
            code, message = None, ""
            try:
                return self._answer(method, raw, context)
            except PartyError as error:
                code, message = status_code(error), str(error)
            except Exception:  # the agent's own failure: logged whole, answered briefly
                traceback.print_exc(file=sys.stderr)
                self.handler.audit.append(caller="?", method=method, decision="error",
                                          reason="internal error, see the agent's log")  # fmt: skip
                code = grpc.StatusCode.INTERNAL
                message = f"party {self.handler.name}: internal error"
            context.abort(code, bounded(message))
        finally:
            if self._slots is not None:
                self._slots.release()

    def _refuse(self, context, method: str, decision: str, error: PartyError) -> NoReturn:
        self.handler.audit.append(caller="?", method=method, decision=decision, reason=str(error))
        context.abort(status_code(error), bounded(str(error)))

    def _answer(self, method: str, raw: bytes, context: grpc.ServicerContext):
        try:
            caller = self.authenticator.identity(context)
        except Unauthenticated as error:
            self.handler.audit.append(caller="unauthenticated", method=method,
                                      decision="unauthenticated", reason=str(error))  # fmt: skip
            raise Unauthenticated(f"party {self.handler.name}: {error}") from None
        self.handler.admit(caller, method)
        self.handler.authorize(method, caller)
        if len(raw) > self.max_request_bytes:
            self.handler.refuse_oversize(method, caller, len(raw), self.max_request_bytes)
        try:
            request = REQUESTS[method].FromString(raw)
        except DecodeError:
            kind = REQUESTS[method].__name__
            self.handler.reject_malformed(method, caller, "", "request", f"not a {kind}")
        if method not in REPLAYABLE:
            return self.endpoint.answer(method, request, caller)
        key = (caller, method, hashlib.sha256(raw).digest())
        answered = self.answers.claim(key)
        if answered is not None:  # the same request again: the same answer, charged once
            self.handler.audit.append(
                caller=caller, method=method, decision="replayed", samples=answered.samples,
                request_id=request.request_id,
            )  # fmt: skip
            return answered.response
        try:
            response = self.endpoint.answer(method, request, caller)
        except BaseException:
            self.answers.release(key)
            raise
        samples = request.inputs.shape[0] if request.inputs.shape else 0
        self.answers.put(key, Answer(response, samples, response.ByteSize()))
        return response


@dataclass
class PartyServer:
    """A built party server: ``start`` it; ``stop`` turns health NOT_SERVING first, then lets
    in-flight calls finish within the grace period while refusing new ones."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float | None = None) -> None:
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        self.server.stop(grace_s).wait()


def create_server(
    handler: PartyHandler,
    address: str = "127.0.0.1:0",
    *,
    max_message_mb: int = 64,
    max_workers: int = 4,
    max_concurrent_rpcs: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
    authenticator: Authenticator | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> PartyServer:
    """Build (not start) a server for ``handler`` on ``address`` (port 0: a free one).

    Message limits are raised deliberately to ``max_message_mb`` in both directions, and the
    element cap of decoded tensors follows from it. A taken port raises ``ValueError`` (the
    port is never shared with another server). ``credentials``: TLS (see
    :func:`amalgam.protocol.tls.server_credentials`); ``None`` serves plaintext, for loopback tests
    and ``--insecure``. Calls beyond ``max_concurrent_rpcs`` are refused with
    RESOURCE_EXHAUSTED and audited (gRPC itself refuses, unaudited, only beyond
    :data:`REFUSAL_WORKERS` more, or requests over twice the message limit).
    """
    limit = max_message_mb * 1024 * 1024
    # gRPC itself refuses (unaudited) only far beyond what the servicer refuses and audits
    spare = max_concurrent_rpcs + REFUSAL_WORKERS if max_concurrent_rpcs else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(max_workers, spare or 0)),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", 2 * limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a port another agent holds is an error, not shared
        ],
        maximum_concurrent_rpcs=spare,
    )
    authenticator = authenticator or Authenticator(tls=credentials is not None)
    servicer = PartyServicer(handler, limit // 2, authenticator, limit, max_concurrent_rpcs)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # "Failed to bind to address"
        port = 0
    if port == 0:
        raise ValueError(
            f"address: cannot listen on {address}: the port is taken, or the host is not an "
            "address of this machine"
        )
    return PartyServer(server, port, health_servicer)


def serve(config: PartyConfig, handler: PartyHandler, insecure: bool = False, grace_s: float = 5.0):
    """Serve until SIGTERM or SIGINT, then stop gracefully: health turns NOT_SERVING and
    in-flight calls get ``grace_s``. Without ``config.tls`` the server speaks plaintext only
    when ``insecure`` says so, with a warning."""
    if config.tls is None and not insecure:
        raise ValueError(
            f"party {config.name}: no tls: section; make certificates with `amalgam certs` "
            "or pass --insecure for a plaintext agent on a private network"
        )
    keep_freed_memory(config.keep_freed_mb)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)  # before the model thread starts its team
    party = create_server(
        handler,
        config.address,
        max_message_mb=config.max_message_mb,
        max_concurrent_rpcs=config.max_concurrent_rpcs,
        credentials=server_credentials(config.tls) if config.tls else None,
        authenticator=Authenticator(tls=config.tls is not None, tokens=config.tokens),
    )
    if config.tls is None:  # said once it serves: a refused start says only why
        print(
            f"WARNING: party {config.name} serves without TLS: callers are not authenticated "
            "and name themselves",
            file=sys.stderr,
            flush=True,
        )
    party.start()
    host = config.address.rsplit(":", 1)[0]
    print(f"party {handler.name} serving on {host}:{party.port}", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    party.stop(grace_s)
    print(f"party {handler.name} stopped", file=sys.stderr, flush=True)

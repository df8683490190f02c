"""The gRPC face of a party: a thin servicer over :class:`amalgam.party.handler.PartyHandler`.

Authenticate -> decode -> handler -> encode; domain errors map to status codes: a bad tensor or
request -> INVALID_ARGUMENT, a denied capability or caller -> PERMISSION_DENIED, an exhausted
budget or rate -> RESOURCE_EXHAUSTED, a missing or unknown bearer token -> UNAUTHENTICATED.
The server also serves the standard ``grpc.health.v1`` service, which turns NOT_SERVING as
soon as the server starts to stop.
"""

from __future__ import annotations

import hmac
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amalgam.party.config import PartyConfig
from amalgam.party.endpoint import PartyEndpoint
from amalgam.party.handler import PartyHandler
from amalgam.protocol import AUTHORIZATION_METADATA_KEY, CALLER_METADATA_KEY
from amalgam.protocol._generated import party_pb2_grpc
from amalgam.protocol.errors import PartyError, Unauthenticated, status_code
from amalgam.protocol.rpcs import SERVICE_NAME
from amalgam.protocol.tls import peer_identity, server_credentials, token_digest


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


class PartyServicer(party_pb2_grpc.PartyServiceServicer):
    def __init__(
        self, handler: PartyHandler, max_elements: int, authenticator: Authenticator
    ) -> None:
        self.handler = handler
        self.endpoint = PartyEndpoint(handler, max_elements)
        self.authenticator = authenticator

    def _caller(self, context: grpc.ServicerContext, method: str, request_id: str) -> str:
        """The authenticated caller, admitted by the policy; anyone else is audited and
        aborted before the request is even decoded."""
        try:
            caller = self.authenticator.identity(context)
        except Unauthenticated as error:
            self.handler.audit.append(
                caller="unauthenticated",
                method=method,
                decision="unauthenticated",
                request_id=request_id,
                reason=str(error),
            )
            context.abort(status_code(error), f"party {self.handler.name}: {error}")
        try:
            self.handler.admit(caller, method, request_id)
        except PartyError as error:
            context.abort(status_code(error), str(error))
        return caller

    def _serve(self, method: str, request, context):
        caller = self._caller(context, method, request.request_id)
        try:
            return self.endpoint.answer(method, request, caller)
        except PartyError as error:
            context.abort(status_code(error), str(error))

    def Describe(self, request, context):  # noqa: N802 (gRPC method name)
        return self._serve("Describe", request, context)

    def Predict(self, request, context):  # noqa: N802
        return self._serve("Predict", request, context)

    def BatchNormFeedback(self, request, context):  # noqa: N802
        return self._serve("BatchNormFeedback", request, context)

    def Synthesize(self, request, context):  # noqa: N802
        return self._serve("Synthesize", request, context)

    def Activations(self, request, context):  # noqa: N802
        return self._serve("Activations", request, context)

    def Gram(self, request, context):  # noqa: N802
        return self._serve("Gram", request, context)

    def ExportWeights(self, request, context):  # noqa: N802
        yield from self._serve("ExportWeights", request, context)


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
    RESOURCE_EXHAUSTED.
    """
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a port another agent holds is an error, not shared
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    authenticator = authenticator or Authenticator(tls=credentials is not None)
    party_pb2_grpc.add_PartyServiceServicer_to_server(
        PartyServicer(handler, max_elements=limit // 2, authenticator=authenticator), server
    )
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

"""The party's Flower ClientApp: a bridge that forwards each query message, as the serialized
protobuf request it carries, to the organization's own long-running party agent over gRPC,
and sends the agent's answer back.

So the owner's policy, budgets and audit log stay inside the one agent the owner runs, whatever
the coordinator ships: the bridge decodes nothing and decides nothing. A query message has
type ``query.<rpc in lower case>`` and content ``{"query": {"requests": [bytes, ...],
"caller": str, "deadline_s": float}}``: one or more requests of that RPC, each its own call to
the agent (checked, charged and audited there), in order. The reply carries ``{"answer":
{"responses": [bytes, ...]}}`` (ExportWeights, one request: ``"chunks"``, its stream) or
``{"answer": {"code": int, "details": str}}`` with the gRPC status of the first refused call.

Which agent: the SuperNode's node config ``agent="host:port"`` (deployment; with
``tls-cert`` / ``tls-key`` / ``tls-ca`` for mutual TLS, the bridge's certificate being the
identity the agent's policy must list), or, in simulation, the address given for the node's
``partition-id``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from amalgam.protocol import CALLER_METADATA_KEY
from amalgam.protocol.rpcs import REQUESTS, SERVICE_NAME, STREAMING
from amalgam.protocol.schemas import TlsFiles
from amalgam.protocol.tls import channel_credentials

MESSAGE_LIMIT = 64 * 1024 * 1024
_channels: dict[tuple, grpc.Channel] = {}
_channels_lock = threading.Lock()


def _channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    """One channel per agent and credentials, kept for the life of the process."""
    key = (address, tls)
    with _channels_lock:
        if key not in _channels:
            options = [
                ("grpc.max_receive_message_length", MESSAGE_LIMIT),
                ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ]
            if tls is None:
                _channels[key] = grpc.insecure_channel(address, options=options)
            else:
                credentials = channel_credentials(tls)
                _channels[key] = grpc.secure_channel(address, credentials, options=options)
        return _channels[key]


def _agent(context: Context, agents: Sequence[str]) -> tuple[str, TlsFiles | None]:
    config = context.node_config
    if "agent" in config:
        tls = None
        if "tls-cert" in config:
            tls = TlsFiles(cert=config["tls-cert"], key=config["tls-key"], ca=config["tls-ca"])
        return str(config["agent"]), tls
    return agents[int(config["partition-id"])], None


def forward(method: str, message: Message, address: str, tls: TlsFiles | None) -> Message:
    """Send each of the query's requests to the agent as ``method``, one call after the other,
    each with the query's deadline, and wrap the answers; the first refused call ends the
    message with its status."""
    query = message.content["query"]
    channel = _channel(address, tls)
    path = f"/{SERVICE_NAME}/{method}"
    metadata = ((CALLER_METADATA_KEY, str(query["caller"])),)
    timeout = float(query["deadline_s"])
    requests = [bytes(request) for request in query["requests"]]
    try:
        if method in STREAMING:
            call = channel.unary_stream(path)
            (request,) = requests
            answer = ConfigRecord({"chunks": list(call(request, timeout=timeout,
                                                       metadata=metadata))})  # fmt: skip
        else:
            call = channel.unary_unary(path)
            responses = [call(request, timeout=timeout, metadata=metadata) for request in requests]
            answer = ConfigRecord({"responses": responses})
    except grpc.RpcError as error:
        answer = ConfigRecord({"code": error.code().value[0], "details": error.details() or ""})
    return Message(RecordDict({"answer": answer}), reply_to=message)


def bridge_app(agents: Sequence[str] = ()) -> ClientApp:
    """A ClientApp forwarding every PartyService RPC; ``agents``: the agent of each simulated
    node, by partition id (a deployed SuperNode names its own in its node config)."""
    app = ClientApp()
    for method in REQUESTS:

        def handle(message: Message, context: Context, method: str = method) -> Message:
            return forward(method, message, *_agent(context, agents))

        app.query(method.lower())(handle)
    return app


app = bridge_app()  # the ClientApp of a deployed SuperNode

"""Amalgam jobs on Flower: the coordinator as a ServerApp that reaches the parties through a
Flower Grid (SuperLink and SuperNodes in deployment, virtual nodes in simulation).

Each party RPC travels in a query message carrying the serialized protobuf request (see
:mod:`amalgam.party.flower_app`, the bridge on the other side), and a message may carry many:
the prediction chunks of a whole data set travel in as few messages as the message limit
allows, since each message costs seconds of Flower's own latency; :class:`FlowerStub` gives
:class:`amalgam.server.remote.RemoteTeacher` the same call signature as a gRPC stub, so deadlines,
retries, chunking, answer checks and the job runner are the ones of direct gRPC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from amalgam.fusion.teacher import TeacherInfo
from amalgam.protocol._generated import party_pb2
from amalgam.protocol.codec import party_info_from_proto
from amalgam.protocol.rpcs import RESPONSES, STREAMING, query_type
from amalgam.server.fanout import fan_out
from amalgam.server.job import load_job, run_job
from amalgam.server.jobspec import JobSpec
from amalgam.server.remote import RemoteTeacher
from amalgam.server.roster import TooFewParties

NODES_TIMEOUT_S = 120.0  # how long a run waits for the SuperNodes it needs to register
FIRST_CONTACT_S = 180.0  # deadline of a node's first message (it starts its ClientApp)
POLL_S = 0.1


class FlowerRpcError(grpc.RpcError):
    """A failed call over Flower, in the shape of a gRPC error (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


CODES = {code.value[0]: code for code in grpc.StatusCode}


class GridMailbox:
    """Request and reply over one Grid from many threads at once: each caller pushes its
    message and waits for its own reply, while whoever polls pulls every pending reply (one
    lock around the Grid). Unlike ``Grid.send_and_receive`` this lets the calls to several
    parties share each polling round."""

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid, self.poll_s = grid, poll_s
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._replies: dict[str, Message] = {}
        self.rounds = 0  # pulls made

    def request(self, message: Message, timeout_s: float) -> Message | None:
        """The reply to ``message``, or ``None`` when none came within ``timeout_s``."""
        with self._lock:
            (message_id,) = self.grid.push_messages([message])
            self._pending.add(message_id)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if message_id not in self._replies and self._pending:
                    self.rounds += 1
                    for reply in self.grid.pull_messages(set(self._pending)):
                        self._replies[reply.metadata.reply_to_message_id] = reply
                        self._pending.discard(reply.metadata.reply_to_message_id)
                if message_id in self._replies:
                    return self._replies.pop(message_id)
                if time.monotonic() >= deadline:
                    self._pending.discard(message_id)
                    return None
            time.sleep(self.poll_s)


class FlowerStub:
    """The PartyService stub of one SuperNode: ``stub.Predict(request, timeout=...,
    metadata=...)`` sends a query message through ``mailbox`` and decodes the answer;
    ``stub.call_many("Predict", requests, timeout=...)`` carries several calls in one message
    (the bridge makes each its own call to the agent, in order, with ``timeout`` each)."""

    def __init__(self, mailbox: GridMailbox, node_id: int, caller: str) -> None:
        self.mailbox, self.node_id, self.caller = mailbox, node_id, caller

    def __getattr__(self, method: str) -> Callable:
        if method not in RESPONSES:
            raise AttributeError(method)

        def call(request, timeout: float | None = None, metadata=None):
            (response,) = self._call(method, [request], timeout or 30.0)
            return response

        return call

    def call_many(self, method: str, requests: list, timeout: float | None = None, metadata=None):
        """The responses to ``requests``, in order, from one message; the first refused
        request fails the whole message (the answers before it stay in the agent's replay
        cache, so asking again does not charge them twice)."""
        return self._call(method, requests, timeout or 30.0)

    def _call(self, method: str, requests: list, timeout_s: float) -> list:
        query = ConfigRecord(
            {
                "requests": [request.SerializeToString() for request in requests],
                "caller": self.caller,
                "deadline_s": float(timeout_s),
            }
        )
        message = Message(
            RecordDict({"query": query}),
            dst_node_id=self.node_id,
            message_type=query_type(method),
        )
        message_timeout_s = timeout_s * len(requests)  # the agent answers them one by one
        reply = self.mailbox.request(message, message_timeout_s)
        if reply is None:
            raise FlowerRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"node {self.node_id}: no reply in {message_timeout_s}s",
            )
        if reply.has_error():
            raise FlowerRpcError(
                grpc.StatusCode.UNAVAILABLE, f"node {self.node_id}: {reply.error.reason}"
            )
        answer = reply.content["answer"]
        if "code" in answer:
            raise FlowerRpcError(CODES[int(answer["code"])], str(answer["details"]))
        if method in STREAMING:  # one call, its stream of messages
            return [[RESPONSES[method].FromString(chunk) for chunk in answer["chunks"]]]
        return [RESPONSES[method].FromString(response) for response in answer["responses"]]


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = NODES_TIMEOUT_S) -> list[int]:
    """The ids of at least ``count`` registered SuperNodes (the Grid lists a node only once
    it has registered), or ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{len(nodes)} of {count} SuperNodes registered in {timeout_s}s")
        time.sleep(POLL_S)


def flower_teachers(grid: Grid, spec: JobSpec, caller: str = "coordinator") -> list:
    """One :class:`RemoteTeacher` per party of ``spec``, reached through the SuperNode whose
    agent answers Describe with that party's name; parties no node serves are left out while
    the job's ``min_parties`` allows (else :class:`TooFewParties` names them and why)."""
    mailbox = GridMailbox(grid)
    needed = spec.min_parties or len(spec.parties)
    nodes = wait_for_nodes(grid, needed)
    stubs = [FlowerStub(mailbox, node, caller) for node in nodes]
    silent: dict[int, str] = {}

    def describe(stub: FlowerStub) -> TeacherInfo | None:
        try:  # a node's first message also starts its ClientApp: allow for that
            reply = stub.Describe(
                party_pb2.DescribeRequest(), timeout=max(spec.deadline_s, FIRST_CONTACT_S)
            )
        except grpc.RpcError as error:  # its agent does not answer: it serves no party here
            silent[stub.node_id] = f"{error.code().name}: {error.details()}"
            return None
        return TeacherInfo.from_dict(party_info_from_proto(reply.info).model_dump())

    by_name = {
        info.name: (stub, info) for stub, info in zip(stubs, fan_out(describe, stubs)) if info
    }
    teachers = [
        RemoteTeacher(party.name, f"flower node {by_name[party.name][0].node_id}",
                      deadline_s=spec.deadline_s, caller=caller, stub=by_name[party.name][0],
                      info=by_name[party.name][1])
        for party in spec.parties
        if party.name in by_name
    ]  # fmt: skip
    if len(teachers) < needed:
        missing = ", ".join(p.name for p in spec.parties if p.name not in by_name)
        why = "; ".join(f"node {node}: {reason}" for node, reason in silent.items())
        raise TooFewParties(
            f"{len(teachers)} of {len(spec.parties)} parties answered through Flower, the job "
            f"needs {needed} (min_parties): no node answered for {missing}"
            + (f" ({why})" if why else "")
        )
    return teachers


def run_over_grid(grid: Grid, spec: JobSpec) -> tuple[Path, list]:
    """Run ``spec`` with its parties reached through ``grid``; returns the run folder and the
    teachers (with their call statistics)."""
    teachers = flower_teachers(grid, spec)
    return run_job(spec, teachers, progress=False), teachers


app = ServerApp()  # a deployed run: `flwr run` with run config job="<path to job.yaml>"


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    run_dir, _ = run_over_grid(grid, load_job(str(context.run_config["job"])))
    print(f"wrote {run_dir}", flush=True)

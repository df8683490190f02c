"""Domain errors a party reports, and their gRPC status codes.

The party's handler raises them, the servicer maps them to status codes, and
:class:`amalgam.server.remote.RemoteTeacher` maps the codes back, so in-process and remote teachers
fail the same way.
"""

from __future__ import annotations

import grpc


class PartyError(Exception):
    """Base of the errors a party reports to its caller."""


class PolicyDenied(PartyError, PermissionError):
    """The owner's policy does not grant this capability."""


class BudgetExceeded(PartyError):
    """The caller's sample budget would be exceeded."""


class Unauthenticated(PartyError):
    """The caller did not prove an identity the party accepts (a bearer token it lacks)."""


class ModelFailure(PartyError):
    """The party's own model answered NaN or infinite values: nothing is released, nothing
    charged; the caller should treat the party as broken."""


class InvalidRequest(PartyError, ValueError):
    """A request that is malformed for this party; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


MAX_DETAIL = 500  # characters of a message that may come from a caller's own strings


def bounded(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out: what an error
    detail or an audit record may carry of untrusted strings."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


STATUS_CODES: dict[type[PartyError], grpc.StatusCode] = {
    PolicyDenied: grpc.StatusCode.PERMISSION_DENIED,
    BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ModelFailure: grpc.StatusCode.INTERNAL,
}


def status_code(error: PartyError) -> grpc.StatusCode:
    """The status code a party answers ``error`` with."""
    return next(code for kind, code in STATUS_CODES.items() if isinstance(error, kind))


def error_from_status(code: grpc.StatusCode, details: str) -> PartyError | None:
    """The domain error for a status code (``None`` for codes that are not domain errors)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidRequest(field, problem) if problem else InvalidRequest("request", details)
    for kind, kind_code in STATUS_CODES.items():
        if kind_code == code:
            return kind(details)
    return None

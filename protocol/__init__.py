"""Amalgam's wire contract: the ``.proto`` source, generated stubs, the tensor codec and the
pydantic schemas shared by the coordinator and the party agent."""

# gRPC metadata key in which a caller names itself; a party reads it only without TLS (with
# TLS the verified client certificate names the caller).
CALLER_METADATA_KEY = "x-amalgam-caller"
# gRPC metadata key of the bearer token (``Bearer <token>``) for parties that require one.
AUTHORIZATION_METADATA_KEY = "authorization"

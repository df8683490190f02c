"""Amalgam's wire contract: the ``.proto`` source, generated stubs, the tensor codec and the
pydantic schemas shared by the coordinator and the party agent."""

# gRPC metadata key that carries the caller's identity (mTLS identities replace it later).
CALLER_METADATA_KEY = "x-amalgam-caller"

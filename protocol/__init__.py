"""Amalgam's wire contract: the ``.proto`` source, generated stubs, the tensor codec and the
pydantic schemas shared by the coordinator and the party agent."""

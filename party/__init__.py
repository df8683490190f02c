"""The party agent: loads the owner's private model and answers the coordinator under the owner's
policy, through one handler shared by the in-process
:class:`amalgam.party.local.LocalTeacher` and the gRPC service."""

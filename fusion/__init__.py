"""Fusion algorithms in pure PyTorch.

Teachers are reached only through :class:`amalgam.fusion.teacher.Teacher`; nothing here knows about
gRPC, protobuf or the party's policy.
"""

"""Amalgam's Python API, importable as ``amalgam``: what a user of a fused model needs without
the command line.

>>> import amalgam
>>> student, card = amalgam.load_student("runs/<job-id>")
"""

from amalgam.server.student import Student, load_student

__all__ = ["Student", "load_student"]

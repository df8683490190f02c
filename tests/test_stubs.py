"""The checked-in gRPC stubs are exactly what `make proto` generates from party.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) is needed to regenerate")

from amalgam.protocol.generate import ROOT, generate  # noqa: E402

CHECKED_IN = ROOT / "protocol" / "_generated"


def _files(folder: Path) -> dict[str, bytes]:
    """Regular files directly in ``folder`` (bytecode caches are not part of the stubs)."""
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix != ".pyc"
    }


def test_checked_in_stubs_match_fresh_ones(tmp_path):
    fresh_dir = generate(tmp_path)
    assert fresh_dir == tmp_path / "amalgam" / "protocol" / "_generated"

    fresh = _files(fresh_dir)
    checked_in = _files(CHECKED_IN)
    assert {"party_pb2.py", "party_pb2.pyi", "party_pb2_grpc.py", "__init__.py"} <= set(fresh)
    assert sorted(checked_in) == sorted(fresh), "stub file sets differ; run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}; run `make proto` and commit the result"


def test_generated_stubs_import_each_other_by_package_path(tmp_path):
    grpc_stub = (generate(tmp_path) / "party_pb2_grpc.py").read_text()
    assert "from amalgam.protocol._generated import party_pb2" in grpc_stub

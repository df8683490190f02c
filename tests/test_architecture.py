"""The layout's promises (ARCHITECTURE.md), checked on every module's imports, including
those inside functions: protocol <- party <- server, fusion imports none of them, the
coordinator sees a fusion method only through its package's public API, and simulations are
apart from the coordinator core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD_PACKAGES = ("composition", "consolidation", "datafree", "detection", "ot", "amalgamation")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _modules(part: str) -> list[Path]:
    return sorted(p for p in (ROOT / part).rglob("*.py") if "_generated" not in p.parts)


def _offending(part: str, forbidden: tuple[str, ...], skip=lambda path: False) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules(part)
        if not skip(path)
        for name in _imports(path)
        if name.startswith(forbidden)
    ]


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        (
            "fusion",
            ("amalgam.protocol", "amalgam.party", "amalgam.server", "grpc", "google", "flwr"),
        ),  # fmt: skip
        ("protocol", ("amalgam.party", "amalgam.server", "amalgam.fusion")),
        ("party", ("amalgam.server",)),
    ],
)
def test_dependencies_point_one_way(part, forbidden):
    assert _offending(part, forbidden) == []


def test_only_the_simulations_and_the_party_commands_run_parties_in_the_coordinator():
    def runs_parties(path: Path) -> bool:
        return "simulation" in path.parts or "cli" in path.parts

    assert _offending("server", ("amalgam.party",), skip=runs_parties) == []
    assert _offending("server", ("amalgam.server.simulation",), skip=runs_parties) == []


def test_the_coordinator_sees_a_fusion_method_only_through_its_public_api():
    deep = tuple(f"amalgam.fusion.{package}." for package in METHOD_PACKAGES)
    assert _offending("server", deep) == []


def test_the_checks_would_see_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from amalgam.server.job import run_job\n")
    assert _imports(module) == ["amalgam.server.job"]


def test_the_flower_bridge_imports_without_pytorch():
    """A SuperNode starts the bridge afresh for every message: PyTorch's import (seconds)
    would be paid by each one."""
    code = "import sys, amalgam.party.flower_app; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

"""The project as a user installs it: a wheel built from the repository's own files, installed
into a fresh virtual environment without the repository on the path, is one import name,
``amalgam``, with every module, the proto and the stubs' type hints, and a working command.

The fresh environment takes its dependencies (torch, flwr, ...) from this one's site-packages
as a plain path entry: none of this environment's ``.pth`` files run there, so the editable
install of the repository is not visible."""

from __future__ import annotations

import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest
from wheels import CLEAN, fresh_environment, site_packages, sources

PARTS = ("protocol", "party", "server", "fusion")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> Path:
    """The ``python`` of a new virtual environment with only the wheel installed, its
    dependencies taken from this environment's site-packages."""
    python = fresh_environment(tmp_path_factory.mktemp("venv"), wheel)
    (site_packages(python) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=CLEAN)  # fmt: skip


def test_the_wheel_holds_one_package_with_every_module_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("amalgam-")}
    assert tops == {"amalgam"}
    packaged = {
        f"amalgam/{name}"
        for name in sources(*PARTS)
        if Path(name).suffix in (".py", ".proto", ".pyi", ".j2")
    }
    assert packaged <= set(names), sorted(packaged - set(names))
    assert "amalgam/protocol/party.proto" in names and "amalgam/fusion/py.typed" in names


def test_every_module_imports_and_the_command_runs_from_the_wheel(fresh, tmp_path):
    imported = _run(
        fresh,
        "-c",
        "import importlib, pathlib, amalgam\n"
        "root = pathlib.Path(next(iter(amalgam.__path__)))\n"
        "assert 'site-packages' in str(root), root\n"
        "assert callable(amalgam.load_student)\n"
        "names = ['amalgam.' + '.'.join(p.relative_to(root).with_suffix('').parts)"
        "         .removesuffix('.__init__') for p in sorted(root.rglob('*.py'))]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))",
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) >= 80
    amalgam = fresh.parent / "amalgam"
    version = subprocess.run([str(amalgam), "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env=CLEAN)  # fmt: skip
    assert version.returncode == 0 and version.stdout.strip() == "amalgam 0.1.0"
    for command in (["--help"], ["plan", "--help"], ["fuse", "--help"]):
        shown = subprocess.run([str(amalgam), *command], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120, env=CLEAN)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("usage: amalgam")
    assert "amalgamate" in shown.stdout  # fuse --help lists the method table

"""The project as a user installs it: a wheel built from the repository's own files, installed
into a fresh virtual environment without the repository on the path, is one import name,
``amalgam``, with every module, the proto and the stubs' type hints, and a working command.

The fresh environment takes its dependencies (torch, flwr, ...) from this one's site-packages
as a plain path entry: none of this environment's ``.pth`` files run there, so the editable
install of the repository is not visible."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("protocol", "party", "server", "fusion")
# what could point an interpreter at this environment's packages: the fresh one must see only
# the wheel and the plain path entry below
CLEAN = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                          "VIRTUAL_ENV")}  # fmt: skip

pytestmark = pytest.mark.slow


def _sources(*paths: str) -> list[str]:
    """The files of the checkout below ``paths`` that git tracks or would (not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [name for name in listed.stdout.split() if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout is left untouched)."""
    source = tmp_path_factory.mktemp("source")
    for name in _sources(*PARTS, "pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("amalgam-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> Path:
    """The ``python`` of a new virtual environment with only the wheel installed."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, env=CLEAN,
    )  # fmt: skip
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, env=CLEAN,
        ).stdout.strip()
    )  # fmt: skip
    assert (target / "amalgam").is_dir(), installed.stdout + installed.stderr
    (target / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=CLEAN)  # fmt: skip


def test_the_wheel_holds_one_package_with_every_module_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("amalgam-")}
    assert tops == {"amalgam"}
    sources = {
        f"amalgam/{name}"
        for name in _sources(*PARTS)
        if Path(name).suffix in (".py", ".proto", ".pyi")
    }
    assert sources <= set(names), sorted(sources - set(names))
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

"""A wheel of the project and fresh virtual environments that hold it: what the wheel and
party-install tests share (the ``wheel`` fixture is in conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what could point an interpreter at this environment's packages: a fresh one must see only
# the wheel and the plain path entries it is given
CLEAN = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                          "VIRTUAL_ENV")}  # fmt: skip


def sources(*paths: str) -> list[str]:
    """The files of the checkout below ``paths`` that git tracks or would (not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [name for name in listed.stdout.split() if (ROOT / name).is_file()]


def build_wheel(source: Path, out: Path, parts: tuple[str, ...]) -> Path:
    """A wheel built from a copy of the sources in ``source`` (the checkout is untouched)."""
    for name in sources(*parts, "pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("amalgam-*.whl")
    return built


def site_packages(python: Path) -> Path:
    return Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, env=CLEAN,
        ).stdout.strip()
    )  # fmt: skip


def fresh_environment(folder: Path, wheel: Path) -> Path:
    """The ``python`` of a new virtual environment in ``folder`` with the wheel alone
    (no dependency: give them as a ``.pth`` path entry)."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, env=CLEAN,
    )  # fmt: skip
    assert (site_packages(python) / "amalgam").is_dir(), installed.stdout + installed.stderr
    return python

"""A party host installs ``amalgam[party]`` only: a fresh environment with the wheel and exactly
the distributions that group requires (resolved from the wheel's own metadata, linked from
this environment, nothing downloaded) serves a model, and a command of another group says
which extra it needs."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from parties import tiny_handler
from safetensors.torch import save_file
from wheels import CLEAN, fresh_environment, site_packages

from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.processes import end, spawn

pytestmark = pytest.mark.slow

NOT_FOR_PARTIES = {
    "flwr",
    "ray",
    "pot",
    "scikit-learn",
    "pycocotools",
    "matplotlib",
}  # (torch needs jinja2)


def _closure(requirements: list[str], extras: set[str]) -> set[str]:
    """The distributions ``requirements`` need, with ``extras`` of the first level, found
    in this environment (names normalised)."""
    needed: set[str] = set()
    queue = [(Requirement(r), extras) for r in requirements]
    while queue:
        requirement, wanted = queue.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in wanted | {""}
        ):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in needed:
            continue
        needed.add(name)
        nested = set(requirement.extras)
        queue += [(Requirement(r), nested) for r in metadata.distribution(name).requires or []]
    return needed


def _link_site(folder: Path, distributions: set[str]) -> None:
    """Symbolic links in ``folder`` to the top-level files of ``distributions`` (and their
    metadata) in this environment's site-packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for name in distributions:
        for file in metadata.distribution(name).files or []:
            top = Path(file).parts[0]
            if top in ("..", "__pycache__") or (folder / top).exists():
                continue
            if (site / top).exists():
                (folder / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def party_python(tmp_path_factory, wheel) -> Path:
    """The python of a fresh environment with the wheel and the ``party`` group alone."""
    python = fresh_environment(tmp_path_factory.mktemp("party-venv"), wheel)
    own = metadata.distribution("amalgam").requires or []
    needed = _closure([r for r in own if "extra ==" not in r or '"party"' in r], {"party"})
    needed.discard("amalgam")
    assert not needed & NOT_FOR_PARTIES, needed & NOT_FOR_PARTIES
    site = tmp_path_factory.mktemp("party-site") / "site"
    _link_site(site, needed)
    (site_packages(python) / "dependencies.pth").write_text(f"{site}\n")
    return python


def test_a_party_only_environment_serves_a_model(party_python, tmp_path):
    for module in ("sklearn", "ot", "flwr", "matplotlib", "pycocotools"):
        missing = subprocess.run([str(party_python), "-c", f"import {module}"],
                                 capture_output=True, text=True, env=CLEAN)  # fmt: skip
        assert missing.returncode != 0, f"{module} should not be installed"
    handler = tiny_handler(tmp_path)  # only for its model: the agent below loads it from disk
    save_file(handler.model.state_dict(), str(tmp_path / "acme.safetensors"))
    config = {
        "name": "acme",
        "address": "127.0.0.1:0",
        "model": {"arch": "mlp", "kwargs": {"in_shape": [1, 8, 8], "num_classes": 3,
                                            "hidden": 16},
                  "weights": "acme.safetensors"},
        "class_names": ["cat", "dog", "eel"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {"output": "probs"}, "activations": {"layers": ["*"]}},
        "audit_log": "audit.jsonl",
    }  # fmt: skip
    (tmp_path / "acme.yaml").write_text(yaml.safe_dump(config))
    command = [str(party_python), "-m", "amalgam.server.cli", "party", "serve", "--config",
               str(tmp_path / "acme.yaml"), "--insecure"]  # fmt: skip
    agent = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLEAN,
                  cwd=tmp_path)  # fmt: skip
    try:
        line = agent.stdout.readline()
        assert " serving on " in line, agent.stderr.read()
        import torch

        with RemoteTeacher("acme", line.split()[-1]) as teacher:
            probs = teacher.predict(torch.rand(5, 1, 8, 8))
            traced = teacher.info.feature_layers  # traced without the coordinator's libraries
        assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5))
        assert traced == (("body.2", (16,)), ("body.4", (16,)))
    finally:
        end([agent])
    # a coordinator's command says which group it needs, in one line
    fuse = subprocess.run([str(party_python), "-m", "amalgam.server.cli", "market"],
                          capture_output=True, text=True, env=CLEAN, cwd=tmp_path)  # fmt: skip
    assert fuse.returncode == 2
    assert re.search(r"needs amalgam\[coordinator\] .*pip install 'amalgam\[coordinator\]'",
                     fuse.stderr), fuse.stderr  # fmt: skip

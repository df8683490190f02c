"""deploy/ checked without Docker or Kubernetes: the compose file against the Compose
specification's schema, the manifests parse and refer to what they define, the party config
inside them validates, and every command the files run exists, with flags its program knows
(``amalgam`` commands parse with the real CLI; Flower's flags appear in its own --help)."""

from __future__ import annotations

import importlib
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from amalgam.party.config import PartyConfig
from amalgam.server.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
BIN = Path(sys.executable).parent
PROGRAMS = {"amalgam", "flower-superlink", "flower-supernode", "flwr"}


@cache
def _help(program: str) -> str:
    return subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True).stdout


def check_command(argv: list[str]) -> None:
    """The program exists in this environment and takes these arguments."""
    program, args = Path(argv[0]).name, argv[1:]
    assert program in PROGRAMS, argv
    assert shutil.which(program, path=str(BIN)), program
    if program == "amalgam":
        try:
            build_parser().parse_args(args)
        except SystemExit as exit:  # --help exits 0; a bad argument exits 2
            assert exit.code == 0, argv
    elif program.startswith("flower-"):
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", _help(program)), (program, flag)


def _shell_commands(script: str) -> list[list[str]]:
    """The amalgam / flwr / flower-* invocations of a shell script, one per line."""
    found = []
    for line in script.splitlines():
        line = line.strip().split("$(")[-1]  # the command of a $(...) substitution
        words = shlex.split(line.split("|")[0], posix=True) if line else []
        if words and words[0] in PROGRAMS:
            found.append(words)
    return found


def _compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_specification():
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    jsonschema.validate(_compose(), json.loads(schema_file.read_text()))


def test_every_compose_command_exists_with_its_flags():
    services = _compose()["services"]
    checked = 0
    for name, service in services.items():
        for key in ("entrypoint", "command"):
            argv = service.get(key)
            if not argv:
                continue
            if argv[0] == "sh":
                for command in _shell_commands(argv[-1]):
                    check_command(command)
                    checked += 1
            else:
                check_command(argv)
                checked += 1
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    assert checked >= len(services)


def test_compose_federation_is_what_amalgam_demo_prepares(tmp_path):
    """The files the services read are the ones `amalgam demo --prepare` writes."""
    from amalgam.server.simulation.demo_parties import prepare_federation

    written = {p.relative_to(tmp_path) for p in prepare_federation(tmp_path)}
    text = (DEPLOY / "compose.yaml").read_text()
    for path in re.findall(r"/federation/([\w./-]+\.(?:yaml|pem|key|ssh|pub))", text):
        assert Path(path) in written, path


def _manifests(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))


@pytest.mark.parametrize("name", ["party.yaml", "superlink.yaml"])
def test_kubernetes_manifests_parse_and_refer_to_what_they_define(name):
    documents = _manifests(name)
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in documents)
    kinds = {d["kind"]: d for d in documents}
    assert {"Secret", "Deployment", "Service"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert kinds["Service"]["spec"]["selector"] == labels
    defined = {d["metadata"]["name"] for d in documents}
    for volume in pod["spec"]["volumes"]:
        reference = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get(
            "name"
        )
        assert reference is None or reference in defined, reference
    for container in pod["spec"]["containers"]:
        check_command(container["command"])
        probe = container.get("readinessProbe", {}).get("exec")
        if probe:
            check_command(probe["command"])
        ports = {p.get("name") for p in container.get("ports", [])}
        for port in kinds["Service"]["spec"]["ports"]:
            assert port["targetPort"] in ports or not ports


def test_the_party_config_in_the_manifest_validates():
    config_map = next(d for d in _manifests("party.yaml") if d["kind"] == "ConfigMap")
    config = PartyConfig.model_validate(yaml.safe_load(config_map["data"]["party.yaml"]))
    assert config.tls is not None and config.policy.allows("northwind-node", "predict")


@pytest.mark.parametrize("name", ["Dockerfile.party", "Dockerfile.coordinator"])
def test_dockerfiles_copy_what_exists_and_run_what_is_installed(name):
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    root = DEPLOY.parent
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "COPY":
            for source in rest.split()[:-1]:
                assert (root / source).exists(), source
        if instruction in ("ENTRYPOINT", "CMD") and rest.startswith("["):
            check_command(json.loads(rest))
        if instruction == "HEALTHCHECK":
            check_command(shlex.split(rest.split("CMD", 1)[1].replace('"$', '"')))


@pytest.mark.parametrize("name", ["amalgam-party.service", "amalgam-supernode.service"])
def test_systemd_units_run_installed_commands(name):
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE)
    check_command(shlex.split(exec_start))


def test_the_flower_app_names_amalgams_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    app = tomllib.loads((DEPLOY / "flower-app" / "pyproject.toml").read_text())["tool"]["flwr"]
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for component, reference in app["app"]["components"].items():
        module, _, attribute = reference.partition(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kinds[component])
    assert "job" in app["app"]["config"]

"""protocol/loading.py + protocol/schemas.py + party/config.py: YAML files validate into strict
pydantic models, and every problem is ONE line naming the file and the dotted field."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from amalgam.party.config import PartyConfig, load_party_config
from amalgam.protocol.loading import ConfigError, load_yaml
from amalgam.protocol.schemas import PredictPolicy
from amalgam.server.jobspec import JobSpec

JOB = """\
name: digits-demo
seed: 3
parties:
  - name: hospital-a
    address: hospital-a.internal:50051
  - name: hospital-b
    address: 10.0.0.7:443
method:
  name: composition
  params:
    rule: consensus
    entropy_threshold: 0.4
    targets: hard
student:
  arch: small_cnn
  epochs: 2
data:
  unlabeled: digits:public
  test: digits:test
"""

PARTY = """\
name: hospital-a
address: 0.0.0.0:50051
model:
  arch: mlp
  kwargs: {in_shape: [1, 8, 8], num_classes: 3}
  weights: teacher.safetensors
class_names: [zero, one, two]
input_shape: [1, 8, 8]
normalization: {mean: [0.5], std: [0.25]}
policy:
  predict: {output: topk, top_k: 2, temperature: 2.0, round_decimals: 3}
  max_batch: 64
  sample_budget: 1000
audit_log: logs/audit.jsonl
"""


def _write(tmp_path: Path, text: str, name: str = "file.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _error(path: Path, model) -> str:
    with pytest.raises(ConfigError) as info:
        load_yaml(path, model)
    message = str(info.value)
    assert all(line.startswith(f"{path}: ") for line in message.splitlines()), message
    return message


# --- valid files ----------------------------------------------------------------------------


def test_valid_job_loads(tmp_path):
    job = load_yaml(_write(tmp_path, JOB), JobSpec)
    assert job.name == "digits-demo"
    assert job.seed == 3
    assert [(p.name, p.address) for p in job.parties] == [
        ("hospital-a", "hospital-a.internal:50051"),
        ("hospital-b", "10.0.0.7:443"),
    ]
    assert job.method.name == "composition"
    assert job.method.params.rule == "consensus"
    assert job.method.params.entropy_threshold == 0.4
    assert job.method.params.targets == "hard"
    assert job.method.params.finetune_epochs == 5  # default
    assert (job.student.arch, job.student.epochs, job.student.batch_size) == ("small_cnn", 2, 64)
    assert (job.data.unlabeled, job.data.test) == ("digits:public", "digits:test")
    assert job.output_dir == "runs"


def test_valid_party_config_loads(tmp_path):
    config = load_yaml(_write(tmp_path, PARTY), PartyConfig)
    assert config.name == "hospital-a"
    assert config.model.arch == "mlp"
    assert config.model.kwargs == {"in_shape": [1, 8, 8], "num_classes": 3}
    assert config.input_shape == (1, 8, 8)
    assert config.normalization.mean == [0.5]
    assert config.policy.predict == PredictPolicy(
        output="topk", top_k=2, temperature=2.0, round_decimals=3
    )
    assert config.policy.max_batch == 64
    assert config.policy.sample_budget == 1000
    assert config.policy.capabilities == ["predict"]


def test_party_config_without_policy_denies_everything(tmp_path):
    text = PARTY[: PARTY.index("policy:")] + "audit_log: audit.jsonl\n"
    config = load_yaml(_write(tmp_path, text), PartyConfig)
    assert config.policy.predict is None
    assert config.policy.capabilities == []


def test_load_party_config_resolves_paths_next_to_the_file(tmp_path):
    folder = tmp_path / "party"
    folder.mkdir()
    config = load_party_config(_write(folder, PARTY))
    assert config.model.weights == str(folder.resolve() / "teacher.safetensors")
    assert config.audit_log == str(folder.resolve() / "logs" / "audit.jsonl")


def test_loaded_models_are_frozen(tmp_path):
    job = load_yaml(_write(tmp_path, JOB), JobSpec)
    with pytest.raises(ValidationError, match="frozen"):
        job.seed = 4


# --- one-line errors naming file and field --------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        ("seed: 3", "seeed: 3", "seeed", "Extra inputs are not permitted"),
        ("  epochs: 2", "  epochs: 2\n  epoch: 3", "student.epoch", "Extra inputs"),
        (
            "    address: 10.0.0.7:443",
            "    address: 10.0.0.7:443\n    token: x",
            "parties.1.token",
            "Extra inputs",
        ),
        ("seed: 3", "seed: three", "seed", "integer"),
        ("  epochs: 2", "  epochs: [2]", "student.epochs", "integer"),
        (
            "    entropy_threshold: 0.4",
            "    entropy_threshold: 1.5",
            "method.params.entropy_threshold",
            "less than or equal to 1",
        ),
        ("    targets: hard", "    targets: fuzzy", "method.params.targets", "'hard' or 'soft'"),
        ("  name: composition", "  name: ensemble", "method.name", "composition"),
        ("hospital-a.internal:50051", "hospital-a.internal", "parties.0.address", "host:port"),
        ("hospital-a.internal:50051", "hospital-a.internal:port", "parties.0.address", "host:port"),
        ("10.0.0.7:443", "10.0.0.7 :443", "parties.1.address", "host:port"),
        ("name: hospital-b", "name: hospital-a", "parties", "unique, repeated: hospital-a"),
        ("name: digits-demo", "name: digits demo", "name", "only letters, digits"),
        ("  test: digits:test\n", "", "data.test", "Field required"),
    ],
)
def test_job_errors_name_the_dotted_field(tmp_path, old, new, field, problem):
    path = _write(tmp_path, _edit(JOB, old, new), "job.yaml")
    message = _error(path, JobSpec)
    assert message.startswith(f"{path}: {field}: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        ("  max_batch: 64", "  max_batch: 64\n  max_bach: 5", "policy.max_bach", "Extra inputs"),
        ("output: topk", "output: raw", "policy.predict.output", "'logits'"),
        ("temperature: 2.0", "temperature: 0", "policy.predict.temperature", "greater than 0"),
        ("input_shape: [1, 8, 8]", "input_shape: [1, 8]", "input_shape.2", "Field required"),
        (
            "  sample_budget: 1000",
            "  sample_budget: -1",
            "policy.sample_budget",
            "greater than or equal to 0",
        ),
        ("std: [0.25]", "std: [0.25, 1.0]", "normalization", "one value per channel"),
        (
            "class_names: [zero, one, two]",
            "class_names: [zero, one, one]",
            "(top level)",
            "class_names must be unique",
        ),
        ("  weights: teacher.safetensors\n", "", "model", "arch needs weights"),
    ],
)
def test_party_config_errors_name_the_dotted_field(tmp_path, old, new, field, problem):
    path = _write(tmp_path, _edit(PARTY, old, new), "party.yaml")
    message = _error(path, PartyConfig)
    assert message.startswith(f"{path}: {field}: "), message
    assert problem in message


def test_every_error_of_a_file_is_listed_one_line_each(tmp_path):
    text = _edit(_edit(JOB, "seed: 3", "seed: x"), "  epochs: 2", "  epochs: y")
    path = _write(tmp_path, text)
    lines = _error(path, JobSpec).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["seed", "student.epochs"]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("name: digits-demo", "name: my job", "'my job': use only letters, digits"),
        ("address: hospital-a.internal:50051", "address: nowhere", "'nowhere' is not host:port"),
    ],
)
def test_form_errors_are_in_plain_words_without_a_regular_expression(tmp_path, old, new, expected):
    message = _error(_write(tmp_path, _edit(JOB, old, new)), JobSpec)
    assert expected in message and "^" not in message and "\\" not in message


def test_overrides_set_nested_values_and_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path, JOB)
    spec = load_yaml(path, JobSpec, ["student.epochs=7", "parties.0.address=h:1", "seed=5"])
    assert (spec.student.epochs, spec.parties[0].address, spec.seed) == (7, "h:1", 5)
    with pytest.raises(ConfigError, match=r": student.epochs: .*integer"):
        load_yaml(path, JobSpec, ["student.epochs=many"])
    for bad, problem in [
        ("student.epochs", "expected key.path=value"),
        ("parties.9.address=h:1", "parties has no item 9"),
        ("seed.x=1", "seed is not a mapping"),
    ]:
        with pytest.raises(ConfigError, match=rf"^--set {re.escape(bad)}: {problem}"):
            load_yaml(path, JobSpec, [bad])


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "name: x\nparties: [unclosed\n", "broken.yaml")
    message = _error(path, JobSpec)
    assert "invalid YAML" in message
    assert "(line 3)" in message


def test_tab_indentation_is_invalid_yaml(tmp_path):
    message = _error(_write(tmp_path, "name: x\nstudent:\n\tepochs: 2\n"), JobSpec)
    assert "invalid YAML" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    message = _error(_write(tmp_path, text), JobSpec)
    assert "expected a mapping at the top level" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "job.yaml"
    message = _error(path, JobSpec)
    assert "cannot read" in message


def test_a_folder_is_not_a_config_file(tmp_path):
    message = _error(tmp_path, JobSpec)
    assert "cannot read" in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_control_character_error_is_one_line(tmp_path):
    path = tmp_path / "control.yaml"
    path.write_text("name: a\x01b\n")
    _error(path, JobSpec)


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    _error(path, JobSpec)

"""Data-free fusion: generator, variants, collapse warning, and an end-to-end run through real
gRPC parties on the digits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from amalgam.fusion.data import load_source
from amalgam.fusion.datafree.generator import Generator, augment
from amalgam.fusion.datafree.party_side import PartySideFusion
from amalgam.fusion.datafree.trainer import VARIANTS, DataFreeConfig, DataFreeFusion
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Feedback, TeacherInfo
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.party.local import LocalTeacher
from amalgam.protocol.errors import InvalidRequest, PolicyDenied
from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import BnFeedbackPolicy, Policy, PredictPolicy, SynthesizePolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import local_party, serving

DIGITS = [str(d) for d in range(10)]
QUIET = RunContext(progress=False)
TINY = dict(warmup=3, iterations=4, student_steps=2, batch_size=16, generator_width=8)


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datafree")
    made = []
    for i in range(2):
        data = load_source(f"digits:private-{i}")
        torch.manual_seed(i)
        model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=8)
        fit(model, data.x, data.y, epochs=5, batch_size=32, progress=False)
        policy = Policy(
            predict=PredictPolicy(output="logits"),
            bn_feedback=BnFeedbackPolicy(cost=1),
            synthesize=SynthesizePolicy(),
            sample_budget=None,
        )
        made.append(local_party(f"p{i}", model, DIGITS, (1, 8, 8), policy, folder))
    return made


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_generator_makes_images_in_the_party_input_range(shape):
    images = Generator(shape, latent_dim=10, width=4).sample(3)
    assert images.shape == (3, *shape)
    assert images.min() >= 0 and images.max() <= 1


def test_augment_translates_within_the_shift():
    x = torch.zeros(8, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 1.0  # a 2x2 blob away from the border
    shifted = augment(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # nothing cut off
    assert torch.equal(augment(x, 0), x)


@pytest.mark.parametrize("method", list(VARIANTS))
def test_every_variant_trains_through_the_same_code_path(handlers, method):
    teachers = [LocalTeacher(h) for h in handlers]
    result = DataFreeFusion(teachers, DataFreeConfig(variant=method, **TINY), context=QUIET).run(
        checkpoints=2
    )
    history = result.history
    assert len(history["student/kl"]) == TINY["iterations"] * TINY["student_steps"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in history.values())
    assert ("assistant0/kl" in history) == (method == "dfmf")
    # every variant makes the same generator updates: a frozen one warms up for longer
    generator_steps = TINY["warmup"] + TINY["iterations"]
    assert len(history["generator0/total"]) == generator_steps
    assert len(history["generator1/total"]) == generator_steps
    assert ("generator0/adversarial" in history) == (VARIANTS[method].adversary is not None)
    assert len(result.samples) == 3 and result.samples[0][0].shape == (16, 1, 8, 8)


@pytest.mark.parametrize("assistant_steps", [1, 3])
def test_assistants_take_m_ga_steps_per_iteration_on_a_schedule_that_ends_the_run(
    handlers, assistant_steps
):
    config = DataFreeConfig(variant="dfmf", assistant_steps=assistant_steps, **TINY)
    fusion = DataFreeFusion([LocalTeacher(h) for h in handlers], config, context=QUIET)
    result = fusion.run()
    updates = TINY["iterations"] * assistant_steps
    b = TINY["batch_size"]
    for k, trainer in enumerate(fusion.trainers):
        assert len(result.history[f"assistant{k}/kl"]) == updates
        # cosine over the assistant's own updates: its learning rate has decayed to zero
        assert trainer.assistant_sched.last_epoch == updates
        assert trainer.assistant_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
        # generator steps, then the assistant's fresh batches, labelled by the teacher
        generator_steps = TINY["warmup"] + TINY["iterations"]
        assert trainer.queries == (generator_steps + updates - TINY["iterations"]) * b
    assert fusion.student_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "variant, alpha, expected", [("dfmf", {}, 1.0), ("dfq", {}, 1.0), ("dfmf", {"alpha": 0.1}, 0.1)]
)
def test_the_fidelity_weight_alpha_scales_only_the_fidelity_terms(
    handlers, variant, alpha, expected
):
    config = DataFreeConfig(variant=variant, **alpha, **TINY)
    fusion = DataFreeFusion([LocalTeacher(h) for h in handlers], config, context=QUIET)
    objective = fusion.trainers[0].objective(adversarial=True)
    assert (objective.bn, objective.instance_entropy, objective.batch_entropy) == pytest.approx(
        (expected, expected, expected)
    )
    assert objective.adversarial == 1.0
    warmup = fusion.trainers[0].objective(adversarial=False)
    assert (warmup.bn, warmup.adversarial) == (1.0, 0.0)


def test_end_to_end_through_real_grpc_parties(handlers):
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        teachers = [RemoteTeacher("p0", a0), RemoteTeacher("p1", a1)]
        before = [p.clone() for p in Generator((1, 8, 8), 100, 8).parameters()]
        result = DataFreeFusion(
            teachers, DataFreeConfig(variant="dfmf", **TINY), context=QUIET
        ).run()
        for t in teachers:
            t.close()
    b, steps = TINY["batch_size"], TINY["warmup"] + TINY["iterations"]
    student_samples = TINY["iterations"] * TINY["student_steps"] * 2 * (b // 2)
    # every assistant's M_GA - 1 fresh batches per iteration (the first is the generator's)
    assistant_samples = TINY["iterations"] * (DataFreeConfig().assistant_steps - 1) * b
    for handler in handlers:
        records = [r for r in read_records(handler.audit.path) if r["caller"] == "coordinator"]
        feedback = [r for r in records if r["method"] == "BatchNormFeedback"]
        predicted = [r for r in records if r["method"] == "Predict"]
        assert len(feedback) == steps and all(r["samples"] == b for r in feedback)
        assert sum(r["samples"] for r in predicted) == student_samples + assistant_samples
        assert result.queries[handler.name] == steps * b + student_samples + assistant_samples
    after = list(result.generators[0].parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


class ConstantTeacher:
    """Always answers ``label`` with certainty, whatever the input: a collapsed generator's
    view of the world."""

    def __init__(self, label=0, name="flat", margin=40.0):
        self.info = TeacherInfo(name, tuple(DIGITS), (1, 8, 8), "logits")
        self.label, self.margin = label, margin

    def _logits(self, x):
        logits = torch.full((len(x), 10), -self.margin / 2)
        logits[:, self.label] = self.margin / 2
        return logits

    def predict(self, x):
        return self._logits(x)

    def bn_feedback(self, x, objective, adversary_logits=None, grad_logits=None):
        return Feedback(self._logits(x), {"bn": 0.0, "total": 0.0}, torch.zeros_like(x))


def test_generator_collapse_is_warned_not_silent():
    config = DataFreeConfig(
        variant="dfq_no_adv",
        warmup=6,
        iterations=1,
        batch_size=8,
        generator_width=4,
        collapse_patience=5,
    )
    with pytest.warns(RuntimeWarning, match="generator of flat may have collapsed"):
        result = DataFreeFusion([ConstantTeacher()], config, context=QUIET).run()
    assert len(result.warnings) == 1


@pytest.mark.parametrize("labels, agreement", [((0, 0), 1.0), ((0, 3), 0.0)])
def test_teacher_agreement_on_the_generated_samples_is_recorded(labels, agreement):
    teachers = [ConstantTeacher(label, f"t{label}-{i}") for i, label in enumerate(labels)]
    config = DataFreeConfig(variant="dfq_no_adv", **TINY)
    history = DataFreeFusion(teachers, config, context=QUIET).run().history
    steps = TINY["iterations"] * TINY["student_steps"]
    assert history["samples/teacher_agreement"] == [agreement] * steps
    fit = history["samples/student_ensemble_agreement"]
    assert len(fit) == steps and all(0.0 <= v <= 1.0 for v in fit)


def test_confidence_weights_let_the_sure_teacher_label_the_sample():
    """Eq. 1 with sample-wise w_k: a teacher sure of class 0 outweighs one that leans to 3."""
    sure, unsure = ConstantTeacher(0, "sure"), ConstantTeacher(3, "unsure", margin=2.0)
    x = torch.zeros(4, 1, 8, 8)
    targets = {
        weights: DataFreeFusion(
            [sure, unsure], DataFreeConfig(teacher_weighting=weights, **TINY), context=QUIET
        ).student_targets(x)
        for weights in ("uniform", "confidence")
    }
    for target in targets.values():
        assert torch.allclose(target.sum(dim=1), torch.ones(4))
    assert (targets["confidence"][:, 0] > targets["uniform"][:, 0] + 0.2).all()
    assert (targets["confidence"][:, 3] < targets["uniform"][:, 3]).all()


def test_bad_configurations_are_refused(handlers):
    with pytest.raises(ValueError, match=r"variant\n.*'dfmf', 'dfq'"):
        DataFreeConfig(variant="dfmx")
    other = ConstantTeacher()
    other.info = TeacherInfo("other", ("a", "b"), (1, 8, 8), "logits")
    with pytest.raises(ValueError, match="same classes"):
        DataFreeFusion([LocalTeacher(handlers[0]), other], DataFreeConfig(**TINY))


@pytest.mark.parametrize("mode", ["coordinator", "party"])
def test_datafree_job_writes_samples_losses_and_per_class_accuracy(handlers, tmp_path, mode):
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        params = {**TINY, "half": True, "mode": mode, "rounds": 2}
        job = {
            "name": "df",
            "parties": [{"name": "p0", "address": a0}, {"name": "p1", "address": a1}],
            "method": {"name": "datafree", "params": params},
            "data": {"test": "digits:test"},
            "output_dir": str(tmp_path / "runs"),
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        spec = load_job(tmp_path / "job.yaml")
        run_dir = run_job(spec, connect(spec), progress=False, log=lambda message: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"teacher:p0", "teacher:p1", "best_teacher", "ensemble", "student"} <= set(
        metrics["results"]
    )
    assert len(metrics["extra"]["per_class"]["student"]) == 10
    for name in ("samples-p0.png", "samples-p1.png", "losses.png", "accuracy.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    report = (run_dir / "report.md").read_text()
    assert "## Accuracy per class, %" in report and "![samples-p1](samples-p1.png)" in report


def test_datafree_job_file_errors_name_the_field(tmp_path):
    job = {
        "name": "df",
        "parties": [{"name": "p0", "address": "127.0.0.1:1"}],
        "method": {"name": "datafree", "params": {"variant": "dfmx"}},
        "data": {"test": "digits:test"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"method\.params\.variant: Input should be 'dfmf'"):
        load_job(tmp_path / "job.yaml")
    job["method"]["params"] = {"variant": "zskt", "mode": "party"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"method\.params\.mode: zskt plays against"):
        load_job(tmp_path / "job.yaml")
    job["method"] = {"name": "composition"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match="data.unlabeled: composition needs unlabeled data"):
        load_job(tmp_path / "job.yaml")


def test_party_side_synthesis_through_real_grpc_parties(handlers):
    config = DataFreeConfig(variant="dfmf", **TINY)
    marks = {h.name: len(read_records(h.audit.path)) for h in handlers}
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        teachers = [RemoteTeacher("p0", a0), RemoteTeacher("p1", a1)]
        result = PartySideFusion(teachers, config, rounds=2, context=QUIET).run(checkpoints=2)
        for t in teachers:
            t.close()
    per_round = TINY["iterations"] // 2
    pool = per_round * TINY["student_steps"] * (TINY["batch_size"] // 2)
    generator_steps = TINY["warmup"] + TINY["iterations"]
    for handler in handlers:
        records = read_records(handler.audit.path)[marks[handler.name] :]
        calls = [r for r in records if r["method"] == "Synthesize"]
        assert [r["samples"] for r in calls] == [pool, pool]  # two round trips for generators
        predicted = sum(r["samples"] for r in records if r["method"] == "Predict")
        assert predicted == 2 * 2 * pool  # each round: both parties' images
        assistant_batches = TINY["iterations"] * (config.assistant_steps - 1)  # at the party
        expected = (generator_steps + assistant_batches) * TINY["batch_size"] + predicted
        assert result.queries[handler.name] == expected
    assert len(result.history["student/kl"]) == TINY["iterations"] * TINY["student_steps"]
    assert result.samples[0][0].shape == (16, 1, 8, 8)
    assert "generator0/adversarial" in result.history


def test_synthesize_is_denied_by_default_and_refuses_student_adversaries(handlers, tmp_path):
    params = DataFreeConfig(variant="dfq", **TINY).model_dump()
    with pytest.raises(InvalidRequest, match="plays against the student"):
        LocalTeacher(handlers[0]).synthesize(params, "s", 1, 4)
    model = handlers[0].model
    closed = local_party(
        "shut", model, DIGITS, (1, 8, 8), Policy(predict=PredictPolicy()), tmp_path
    )
    params["variant"] = "dfmf"
    with pytest.raises(PolicyDenied, match="Synthesize is not granted"):
        LocalTeacher(closed).synthesize(params, "s", 1, 4)

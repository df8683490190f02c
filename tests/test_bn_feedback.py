"""BatchNormFeedback: the BN-statistics loss (paper 003, Eq. 3-4) and its input gradient,
computed by the party, equal the in-process computation; policy, budget and planning."""

from __future__ import annotations

import contextlib

import pytest
import torch
from parties import tiny_handler

from amalgam.fusion.datafree.bn_loss import bn_statistics_loss, gaussian_kl
from amalgam.fusion.datafree.losses import teacher_side_loss
from amalgam.fusion.models import create_model
from amalgam.fusion.teacher import GeneratorObjective
from amalgam.party.audit import read_records
from amalgam.party.local import LocalTeacher
from amalgam.protocol.errors import BudgetExceeded, InvalidRequest, PolicyDenied
from amalgam.protocol.schemas import BnFeedbackPolicy, Policy, PredictPolicy
from amalgam.server.plan import plan
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import serving

CLASSES = ["a", "b", "c"]
BN_ONLY = GeneratorObjective(bn=1.0)
FULL = GeneratorObjective(
    bn=0.7, instance_entropy=0.5, batch_entropy=0.3, adversarial=1.0, temperature=3.0
)
GRANTS = Policy(predict=PredictPolicy(output="logits"), bn_feedback=BnFeedbackPolicy(cost=4))


def bn_teacher(dtype=torch.float64) -> torch.nn.Module:
    """A tiny BN CNN whose running statistics come from data unlike uniform noise."""
    torch.manual_seed(0)
    model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3, width=2)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(16, 1, 8, 8) * 0.3 + 0.5)
    return model.eval().to(dtype)


def reference(model, x, objective, adversary, grad_logits):
    """The teacher-side loss and its input gradient computed directly on the model."""
    inputs = x.clone().requires_grad_(True)
    with bn_statistics_loss(model) as losses:
        logits = model(inputs)
    total, parts = teacher_side_loss(logits, torch.stack(losses).sum(), objective, adversary)
    (grad,) = torch.autograd.grad(total + (logits * grad_logits).sum(), inputs)
    return logits.detach(), parts, grad


@contextlib.contextmanager
def local(handler):
    yield LocalTeacher(handler)


@contextlib.contextmanager
def remote(handler, half=False):
    wire = {"bn_feedback"} if half else ()
    with serving(handler) as address, RemoteTeacher("acme", address, half=wire) as teacher:
        yield teacher


def test_gaussian_kl_is_zero_only_for_matching_statistics():
    mu, var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    assert torch.allclose(gaussian_kl(mu, var, mu, var), torch.zeros(2))
    assert (gaussian_kl(mu + 0.1, var, mu, var) > 0).all()
    assert (gaussian_kl(mu, var * 1.5, mu, var) > 0).all()


def test_bn_loss_is_differentiable_in_the_inputs():
    model = bn_teacher()

    def loss_of(x):
        with bn_statistics_loss(model) as losses:
            model(x)
        return torch.stack(losses).sum()

    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (x,))


@pytest.mark.parametrize("make", [local, remote], ids=["local", "remote"])
def test_feedback_equals_the_in_process_computation(tmp_path, make):
    model = bn_teacher()
    handler = tiny_handler(tmp_path, GRANTS, classes=CLASSES, model=model)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    grad_logits = torch.randn(6, 3, dtype=torch.float64)
    adversary = torch.randn(6, 3, dtype=torch.float64)
    logits, parts, grad = reference(model, x, FULL, adversary, grad_logits)
    with make(handler) as teacher:
        feedback = teacher.bn_feedback(x, FULL, adversary, grad_logits)
    assert parts["bn"] > 0.01 and parts["adversarial"] > 0.01
    assert set(feedback.losses) == {
        "bn",
        "instance_entropy",
        "batch_entropy",
        "adversarial",
        "total",
    }
    for name, value in parts.items():
        assert feedback.losses[name] == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(feedback.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feedback.input_grad, grad, rtol=1e-10, atol=1e-12)
    assert feedback.input_grad.dtype == torch.float64


def test_float16_on_the_wire_halves_the_bytes_and_stays_close(tmp_path):
    model = bn_teacher(torch.float32)
    handler = tiny_handler(tmp_path, GRANTS, classes=CLASSES, model=model)
    x = torch.rand(16, 1, 8, 8)
    grad_logits = torch.randn(16, 3)
    with remote(handler) as full, remote(handler, half=True) as half:
        exact = full.bn_feedback(x, BN_ONLY, grad_logits=grad_logits)
        approx = half.bn_feedback(x, BN_ONLY, grad_logits=grad_logits)
        assert half.stats.bytes_received < 0.6 * full.stats.bytes_received
    assert approx.input_grad.dtype == torch.float32
    torch.testing.assert_close(approx.logits, exact.logits, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(approx.input_grad, exact.input_grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("make", [local, remote], ids=["local", "remote"])
def test_denied_by_default_and_audited(tmp_path, make):
    handler = tiny_handler(tmp_path, Policy(predict=PredictPolicy()), model=bn_teacher())
    with make(handler) as teacher, pytest.raises(PolicyDenied, match="BatchNormFeedback"):
        teacher.bn_feedback(torch.rand(2, 1, 8, 8), BN_ONLY)
    record = read_records(handler.audit.path)[-1]
    assert (record["method"], record["decision"]) == ("BatchNormFeedback", "denied")


def test_budget_is_charged_at_the_policy_cost(tmp_path):
    policy = GRANTS.model_copy(update={"sample_budget": 40})
    handler = tiny_handler(tmp_path, policy, classes=CLASSES, model=bn_teacher(torch.float32))
    with remote(handler) as teacher:
        teacher.bn_feedback(torch.rand(10, 1, 8, 8), BN_ONLY)  # 10 x cost 4 = all the budget
        assert handler.samples_used("coordinator") == 40
        with pytest.raises(BudgetExceeded):
            teacher.predict(torch.rand(1, 1, 8, 8))


def test_grad_logits_of_the_wrong_shape_is_invalid(tmp_path):
    handler = tiny_handler(tmp_path, GRANTS, classes=CLASSES, model=bn_teacher(torch.float32))
    with remote(handler) as teacher, pytest.raises(InvalidRequest) as raised:
        teacher.bn_feedback(torch.rand(4, 1, 8, 8), FULL, torch.zeros(4, 5))
    assert raised.value.field == "objective.adversary_logits.shape"


def test_an_adversarial_objective_without_adversary_logits_is_invalid(tmp_path):
    handler = tiny_handler(tmp_path, GRANTS, classes=CLASSES, model=bn_teacher(torch.float32))
    with remote(handler) as teacher, pytest.raises(InvalidRequest) as raised:
        teacher.bn_feedback(torch.rand(4, 1, 8, 8), FULL)
    assert raised.value.field == "objective.adversary_logits"


def test_a_teacher_without_batchnorm_gives_logit_gradients_only(tmp_path):
    handler = tiny_handler(tmp_path, GRANTS, classes=CLASSES)  # an MLP: no BatchNorm
    x, grad_logits = torch.rand(3, 1, 8, 8), torch.randn(3, 3)
    with remote(handler) as teacher:
        feedback = teacher.bn_feedback(x, BN_ONLY, grad_logits=grad_logits)
        info = teacher.info
    inputs = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((handler.model(inputs) * grad_logits).sum(), inputs)
    assert feedback.losses["bn"] == 0.0
    torch.testing.assert_close(feedback.input_grad, expected)
    verdict = {p.method: p for p in plan([info])}["datafree"]
    assert verdict.possible and verdict.ways == ("variants dafl, zskt",)  # no BN statistics


def test_planner_offers_data_free_only_where_feedback_is_granted(tmp_path):
    granted = tiny_handler(tmp_path, GRANTS, name="acme", model=bn_teacher(torch.float32))
    denied = tiny_handler(
        tmp_path,
        Policy(predict=PredictPolicy(output="logits")),
        name="globex",
        model=bn_teacher(torch.float32),
    )
    infos = [LocalTeacher(granted).info, LocalTeacher(denied).info]
    assert infos[0].batchnorm_layers == 5 and "bn_feedback" in infos[0].capabilities
    verdicts = {p.method: p for p in plan(infos)}
    assert not verdicts["datafree"].possible
    assert verdicts["datafree"].reasons == ("globex: bn_feedback is not granted",)
    assert verdicts["composition"].possible

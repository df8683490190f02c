"""party/handler.py enforces the owner's Policy (protocol/schemas.py): deny by default, output
forms, input validation, per-caller budgets, and an audit record for every decision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from amalgam.fusion.models import create_model
from amalgam.party.audit import AuditLog, read_records, verify_chain
from amalgam.party.handler import (
    BudgetExceeded,
    InvalidRequest,
    PartyHandler,
    PolicyDenied,
    release,
)
from amalgam.party.ratelimit import TokenBuckets
from amalgam.protocol.schemas import LayersPolicy, Normalization, Policy, PredictPolicy, RateLimit

IN_SHAPE = (1, 8, 8)
CLASSES = ["a", "b", "c", "d"]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model("mlp", in_shape=IN_SHAPE, num_classes=len(CLASSES))
    with torch.no_grad():  # spread the logits so softmax values are far from uniform
        net.head.weight.mul_(8.0)
    return net.eval()


@pytest.fixture
def make_handler(model, tmp_path):
    def make(policy: Policy, normalization: Normalization | None = None) -> PartyHandler:
        return PartyHandler(
            name="party-a",
            model=model,
            class_names=CLASSES,
            input_shape=IN_SHAPE,
            policy=policy,
            audit=AuditLog(tmp_path / "audit.jsonl"),
            normalization=normalization,
        )

    return make


@pytest.fixture
def x():
    return torch.rand(6, *IN_SHAPE, generator=torch.Generator().manual_seed(1))


def records(handler: PartyHandler) -> list[dict]:
    return read_records(handler.audit.path)


def logits_of(model, x):
    with torch.no_grad():
        return model(x)


# --- deny by default ------------------------------------------------------------------------


def test_default_policy_grants_nothing():
    assert Policy().predict is None
    assert Policy().capabilities == []
    assert Policy(predict=PredictPolicy()).capabilities == ["predict"]


def test_predict_is_denied_and_audited(make_handler, x):
    handler = make_handler(Policy())
    with pytest.raises(PolicyDenied, match="party-a"):
        handler.predict(x, caller="eve", request_id="r1")

    (record,) = records(handler)
    assert record["decision"] == "denied"
    assert record["method"] == "Predict"
    assert record["caller"] == "eve"
    assert record["request_id"] == "r1"
    assert record["samples"] == 6
    assert record["bytes_out"] == 0
    assert "not granted" in record["reason"]
    assert handler.samples_used("eve") == 0
    assert handler.info.capabilities == []
    assert handler.info.output_form == ""


def test_policy_denied_is_a_permission_error():
    assert issubclass(PolicyDenied, PermissionError)


def test_policy_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        Policy(predcit=PredictPolicy())  # a typo must not silently mean "deny"
    with pytest.raises(ValidationError):
        PredictPolicy(temperature=0)
    with pytest.raises(ValidationError):
        PredictPolicy(top_k=0)
    with pytest.raises(ValidationError):
        PredictPolicy(output="raw")


# --- output forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_logits_are_divided_by_temperature(make_handler, model, x, temperature):
    handler = make_handler(Policy(predict=PredictPolicy(output="logits", temperature=temperature)))
    out = handler.predict(x, caller="bob")
    assert out.dtype == torch.float32
    assert out.shape == (6, 4)
    torch.testing.assert_close(out, logits_of(model, x) / temperature)


def test_probs_are_a_softmax(make_handler, model, x):
    out = make_handler(Policy(predict=PredictPolicy(output="probs"))).predict(x, caller="bob")
    assert out.shape == (6, 4)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(6))
    torch.testing.assert_close(out, F.softmax(logits_of(model, x), dim=1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_keeps_exactly_the_k_largest_probs(make_handler, model, x, k):
    out = make_handler(Policy(predict=PredictPolicy(output="topk", top_k=k))).predict(x, caller="b")
    probs = F.softmax(logits_of(model, x), dim=1)
    assert out.shape == (6, 4)
    assert ((out != 0).sum(dim=1) == k).all()
    top = probs.topk(k, dim=1)
    torch.testing.assert_close(out.gather(1, top.indices), top.values)
    # zeros exactly outside the top k
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top.indices, True)
    assert (out[~mask] == 0).all()


def test_topk_larger_than_the_class_count_releases_all_probs(make_handler, model, x):
    rule = PredictPolicy(output="topk", top_k=10)
    out = make_handler(Policy(predict=rule)).predict(x, caller="b")
    torch.testing.assert_close(out, F.softmax(logits_of(model, x), dim=1))


@pytest.mark.parametrize("temperature", [1.0, 0.1, 10.0])
def test_label_is_the_int64_argmax_whatever_the_temperature(make_handler, model, x, temperature):
    rule = PredictPolicy(output="label", temperature=temperature, round_decimals=0)
    out = make_handler(Policy(predict=rule)).predict(x, caller="bob")
    assert out.dtype == torch.int64
    assert out.shape == (6,)
    assert torch.equal(out, logits_of(model, x).argmax(dim=1))


def test_temperature_flattens_or_sharpens_probs(make_handler, x):
    def probs(temperature):
        rule = PredictPolicy(output="probs", temperature=temperature)
        return make_handler(Policy(predict=rule, sample_budget=None)).predict(x, caller="bob")

    def entropy(p):
        return -(p * p.clamp_min(1e-12).log()).sum(dim=1)

    cold, warm, hot = probs(0.5), probs(1.0), probs(4.0)
    assert (entropy(cold) < entropy(warm)).all()
    assert (entropy(warm) < entropy(hot)).all()
    # temperature never changes the ranking
    assert torch.equal(cold.argmax(dim=1), hot.argmax(dim=1))
    # a huge temperature approaches uniform
    torch.testing.assert_close(probs(1e6), torch.full((6, 4), 0.25), atol=1e-4, rtol=0)


@pytest.mark.parametrize("decimals", [0, 1, 2, 4])
@pytest.mark.parametrize("form", ["logits", "probs", "topk"])
def test_rounding(make_handler, model, x, form, decimals):
    rule = PredictPolicy(output=form, top_k=2, round_decimals=decimals)
    out = make_handler(Policy(predict=rule)).predict(x, caller="bob")
    scaled = out.double() * 10**decimals
    # every released value is a multiple of 10**-decimals (up to float32 representation)
    assert (scaled - scaled.round()).abs().max() < 1e-3
    unrounded = release(logits_of(model, x), rule.model_copy(update={"round_decimals": None}))
    assert (out - unrounded).abs().max() <= 0.5 * 10**-decimals + 1e-6


def test_release_directly():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    torch.testing.assert_close(
        release(logits, PredictPolicy(output="logits", temperature=2)), logits / 2
    )
    topk = release(logits, PredictPolicy(output="topk", top_k=1))
    expected = F.softmax(logits, dim=1).max(dim=1).values
    torch.testing.assert_close(topk.sum(dim=1), expected)
    assert release(logits, PredictPolicy(output="label")).tolist() == [0, 1]


# --- input validation -----------------------------------------------------------------------


def test_batch_over_max_batch_is_invalid(make_handler, x):
    handler = make_handler(Policy(predict=PredictPolicy(), max_batch=4))
    assert handler.predict(x[:4], caller="bob").shape == (4, 4)
    with pytest.raises(InvalidRequest) as info:
        handler.predict(x[:5], caller="bob")
    assert info.value.field == "inputs.shape"
    assert "max_batch 4" in str(info.value)
    assert records(handler)[-1]["decision"] == "invalid"
    assert handler.samples_used("bob") == 4  # the refused batch did not spend budget


@pytest.mark.parametrize(
    "shape",
    [(6, 1, 8, 7), (6, 3, 8, 8), (6, 64), (1, 8, 8), (6, 1, 1, 8, 8), (6, 1, 16, 16)],
)
def test_wrong_shape_is_invalid(make_handler, shape):
    handler = make_handler(Policy(predict=PredictPolicy()))
    with pytest.raises(InvalidRequest) as info:
        handler.predict(torch.rand(shape), caller="bob")
    assert info.value.field == "inputs.shape"
    assert "expected [B, 1, 8, 8]" in str(info.value)
    assert records(handler)[-1]["decision"] == "invalid"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_invalid(make_handler, x, bad):
    handler = make_handler(Policy(predict=PredictPolicy()))
    x = x.clone()
    x[2, 0, 3, 3] = bad
    with pytest.raises(InvalidRequest) as info:
        handler.predict(x, caller="bob")
    assert info.value.field == "inputs.data"
    assert handler.samples_used("bob") == 0
    (record,) = records(handler)
    assert (record["decision"], record["samples"], record["bytes_out"]) == ("invalid", 6, 0)


@pytest.mark.parametrize("extreme", [3e38, -3e38, 1.5, -0.01])
def test_finite_values_outside_the_image_range_are_invalid(make_handler, x, extreme):
    handler = make_handler(Policy(predict=PredictPolicy(output="probs")))
    x = x.clone()
    x[1, 0, 2, 2] = extreme
    with pytest.raises(InvalidRequest, match=r"images must lie in \[0, 1\]") as info:
        handler.predict(x, caller="bob")
    assert info.value.field == "inputs.data"
    assert handler.samples_used("bob") == 0 and records(handler)[-1]["decision"] == "invalid"


def test_non_finite_outputs_of_the_model_are_never_released_nor_charged(tmp_path, x):
    from amalgam.protocol.errors import ModelFailure

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, inputs):
            return torch.full((inputs.shape[0], 4), float("nan")) * self.scale

    handler = PartyHandler("p", Broken(), list("abcd"), IN_SHAPE, Policy(predict=PredictPolicy()),
                           AuditLog(tmp_path / "audit.jsonl"))  # fmt: skip
    with pytest.raises(ModelFailure, match="NaN or infinite values on these inputs"):
        handler.predict(x, caller="bob")
    assert handler.samples_used("bob") == 0
    assert records(handler)[-1]["decision"] == "model_failure"


def test_integer_input_is_invalid(make_handler):
    handler = make_handler(Policy(predict=PredictPolicy()))
    with pytest.raises(InvalidRequest) as info:
        handler.predict(torch.zeros(2, *IN_SHAPE, dtype=torch.uint8), caller="bob")
    assert info.value.field == "inputs.dtype"


def test_invalid_request_is_a_value_error():
    assert issubclass(InvalidRequest, ValueError)


# --- budgets --------------------------------------------------------------------------------


def test_sample_budget_per_caller(make_handler, x):
    handler = make_handler(Policy(predict=PredictPolicy(), sample_budget=10))
    handler.predict(x[:6], caller="alice")
    handler.predict(x[:4], caller="alice")  # exactly at the budget: granted
    assert handler.samples_used("alice") == 10

    with pytest.raises(BudgetExceeded, match="0 left, 1 asked"):
        handler.predict(x[:1], caller="alice")
    assert handler.samples_used("alice") == 10
    assert records(handler)[-1]["decision"] == "budget_exceeded"

    # another caller has a budget of its own
    assert handler.predict(x[:6], caller="bob").shape == (6, 4)
    with pytest.raises(BudgetExceeded, match="4 left, 5 asked"):
        handler.predict(x[:5], caller="bob")
    assert handler.predict(x[:4], caller="bob").shape == (4, 4)
    assert handler.samples_used("bob") == 10

    decisions = [r["decision"] for r in records(handler)]
    assert decisions == [
        "granted",
        "granted",
        "budget_exceeded",
        "granted",
        "budget_exceeded",
        "granted",
    ]


def test_zero_budget_refuses_everything_and_none_is_unlimited(make_handler, x):
    broke = make_handler(Policy(predict=PredictPolicy(), sample_budget=0))
    with pytest.raises(BudgetExceeded):
        broke.predict(x[:1], caller="bob")
    unlimited = make_handler(Policy(predict=PredictPolicy(), sample_budget=None, max_batch=6))
    for _ in range(20):
        unlimited.predict(x, caller="bob")
    assert unlimited.samples_used("bob") == 120


# --- rate limits ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_spends_a_burst_then_refills_at_its_rate():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=10, clock=clock)
    assert buckets.take("alice", 10) is None  # a full bucket at first
    assert buckets.take("alice", 1) == pytest.approx(0.5)  # one token takes 1 / rate
    assert buckets.take("bob", 10) is None  # every caller has a bucket of its own
    clock.now = 2.0  # 4 tokens back
    assert buckets.take("alice", 5) == pytest.approx(0.5)
    assert buckets.take("alice", 4) is None
    clock.now = 100.0  # never more than the burst
    assert buckets.take("alice", 10) is None
    assert buckets.take("alice", 11) == float("inf")


def test_rate_limit_refuses_without_charging_the_budget(make_handler, x):
    limit = RateLimit(samples_per_s=0.001, burst=10)  # the bucket barely refills in a test
    handler = make_handler(Policy(predict=PredictPolicy(), rate_limit=limit, sample_budget=100))
    handler.predict(x[:6], caller="alice")
    with pytest.raises(BudgetExceeded, match=r"rate limit of 0.001 samples/s \(burst 10\) for "
                       r"'alice': 6 asked, retry in"):  # fmt: skip
        handler.predict(x[:6], caller="alice")
    assert handler.samples_used("alice") == 6
    assert records(handler)[-1]["decision"] == "budget_exceeded"
    with pytest.raises(BudgetExceeded, match="more than one burst: send smaller requests"):
        make_handler(Policy(predict=PredictPolicy(), rate_limit=RateLimit(samples_per_s=1, burst=5))
                     ).predict(x, caller="bob")  # fmt: skip


def test_costlier_capabilities_spend_more_of_the_budget(make_handler, x):
    policy = Policy(
        predict=PredictPolicy(), gram=LayersPolicy(layers=["*"], cost=3), sample_budget=30
    )
    handler = make_handler(policy)
    handler.predict(x, caller="alice")  # 6 samples at cost 1
    handler.layers(x, ["body.1"], "alice", gram=True)  # 6 samples at cost 3
    assert handler.samples_used("alice") == 6 + 18


# --- audit of granted calls -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "bytes_per_sample"),
    [
        (PredictPolicy(output="probs"), 4 * 4),  # 4 float32 values
        (PredictPolicy(output="logits"), 4 * 4),
        (PredictPolicy(output="topk", top_k=2), 4 * 4),  # zeros still travel
        (PredictPolicy(output="label"), 8),  # one int64
    ],
)
def test_granted_calls_are_audited(make_handler, x, rule, bytes_per_sample):
    handler = make_handler(Policy(predict=rule))
    handler.predict(x[:3], caller="alice", request_id="q1")
    handler.predict(x, caller="bob", request_id="q2")

    first, second = records(handler)
    assert (first["caller"], first["method"], first["decision"]) == ("alice", "Predict", "granted")
    assert (first["samples"], first["bytes_out"], first["request_id"]) == (
        3,
        3 * bytes_per_sample,
        "q1",
    )
    assert (second["caller"], second["samples"], second["bytes_out"]) == (
        "bob",
        6,
        6 * bytes_per_sample,
    )
    assert verify_chain(records(handler))


def test_describe_is_audited_and_reports_the_policy(make_handler):
    policy = Policy(predict=PredictPolicy(output="topk", top_k=2), max_batch=32)
    handler = make_handler(policy)
    info = handler.describe(caller="carol", request_id="d1")
    assert info.name == "party-a"
    assert info.class_names == CLASSES
    assert info.input_shape == IN_SHAPE
    assert info.capabilities == ["predict"]
    assert info.output_form == "topk"
    assert info.max_batch == 32
    (record,) = records(handler)
    assert (record["method"], record["decision"], record["caller"]) == (
        "Describe",
        "granted",
        "carol",
    )


# --- normalization --------------------------------------------------------------------------


def test_normalization_is_applied_before_the_model(make_handler, model, x):
    norm = Normalization(mean=[0.5], std=[0.25])
    handler = make_handler(Policy(predict=PredictPolicy(output="logits")), normalization=norm)
    torch.testing.assert_close(handler.predict(x, caller="bob"), logits_of(model, (x - 0.5) / 0.25))
    # and it matters: the un-normalized logits differ
    assert not torch.allclose(handler.predict(x, caller="bob"), logits_of(model, x))


def test_per_channel_normalization(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", in_shape=(3, 4, 4), num_classes=2).eval()
    norm = Normalization(mean=[0.1, 0.5, 0.9], std=[0.5, 0.25, 2.0])
    handler = PartyHandler(
        "rgb",
        model,
        ["x", "y"],
        (3, 4, 4),
        Policy(predict=PredictPolicy(output="logits")),
        AuditLog(tmp_path / "a.jsonl"),
        norm,
    )
    x = torch.rand(5, 3, 4, 4)
    mean = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(handler.predict(x, caller="bob"), logits_of(model, (x - mean) / std))


def test_normalization_with_the_wrong_channel_count_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="2 values for 1 channels"):
        PartyHandler(
            "p",
            model,
            CLASSES,
            IN_SHAPE,
            Policy(),
            AuditLog(tmp_path / "a.jsonl"),
            Normalization(mean=[0.5, 0.5], std=[1.0, 1.0]),
        )


def test_empty_activations_and_one_sample_grams(make_handler, x):
    policy = Policy(activations=LayersPolicy(layers=["*"]), gram=LayersPolicy(layers=["*"]))
    handler = make_handler(policy)
    assert handler.layers(x[:0], ["penultimate"], "alice")["penultimate"].shape[0] == 0
    with pytest.raises(InvalidRequest, match="inputs.shape: a Gram matrix needs at least 2"):
        handler.layers(x[:1], ["penultimate"], "alice", gram=True)
    with pytest.raises(InvalidRequest, match="layers: the model has no layer 'nope'"):
        handler.layers(x, ["nope"], "alice")
    assert [r["decision"] for r in records(handler)] == ["granted", "invalid", "invalid"]

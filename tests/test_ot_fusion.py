"""fusion/ot: OT fusion, CKA, cross-layer alignment and layer balancing (paper 002)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from networks import NETWORKS, probe_inputs, trained_like
from permuted import permuted_copy
from torch import nn

from amalgam.fusion.activations import centered_gram, layer_grams, layer_outputs
from amalgam.fusion.models import create_model
from amalgam.fusion.ot.balance import add_identity_units, firing_estimate, merge_hidden_layers
from amalgam.fusion.ot.cka import cka_from_grams, linear_cka
from amalgam.fusion.ot.cla import cross_layer_alignment
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import clafusion, ot_fuse, recompute_batchnorm
from amalgam.fusion.ot.probe import Probe
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec
from amalgam.fusion.ot.transport import align, apply_transport, transport_plan

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _permuted_copy(model: nn.Module, seed: int = 2) -> nn.Module:
    """The same function with the neurons of every group in a random order."""
    return permuted_copy(model, fusion_spec(model), seed)


# ---- OT fusion ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_permuted_copy_changes_weights_not_function(kind):
    model = trained_like(kind)
    clone = _permuted_copy(model)
    x = probe_inputs(kind)
    producer = fusion_spec(model).groups[0].producers[0]
    assert not torch.equal(model.state_dict()[producer], clone.state_dict()[producer])
    torch.testing.assert_close(clone(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(NETWORKS))
@pytest.mark.parametrize("ground_metric", ["weight", "activation"])
def test_fusing_with_a_permuted_copy_reproduces_the_function(kind, ground_metric):
    model = trained_like(kind)
    clone = _permuted_copy(model)
    x = probe_inputs(kind)
    config = OTFusionConfig(ground_metric=ground_metric, plan="emd")
    result = ot_fuse([clone, model], config, probe=x)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=0)
        vanilla = copy.deepcopy(model)
        vanilla.load_state_dict(
            {
                k: (v + clone.state_dict()[k]) / 2 if v.is_floating_point() else v
                for k, v in model.state_dict().items()
            }
        )
        assert (vanilla(x) - model(x)).abs().max() > 1e-2  # plain averaging is not enough
    assert max(result.transport_costs[0].values()) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("mode", ["many_to_one", "iterative"])
def test_three_permuted_copies_fuse_back_to_the_model(mode):
    model = trained_like("resnet")
    copies = [_permuted_copy(model, seed) for seed in (3, 4)]
    x = probe_inputs("resnet")
    config = OTFusionConfig(mode=mode, weights=[0.2, 0.5, 0.3])
    result = ot_fuse([model, *copies], config, probe=x)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=0)


def test_the_base_is_not_aligned_to_itself():
    # an entropic plan of the base onto itself would blur its neurons: the base stays as is,
    # and only the other network is aligned (its weight 0 here)
    model, other = trained_like("mlp"), trained_like("mlp", seed=1)
    calls = []
    config = OTFusionConfig(plan="sinkhorn", ground_metric="weight", weights=[1.0, 0.0])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "amalgam.fusion.ot.fuse.align", lambda *a, **k: calls.append(1) or align(*a, **k)
        )
        result = ot_fuse([model, other], config)
    assert len(calls) == 1 and set(result.transport_costs[0].values()) == {0.0}
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], tensor, atol=1e-6, rtol=0)


def test_fused_model_takes_the_base_widths_and_keeps_dtype():
    wide = create_model("mlp", in_shape=(1, 8, 8), num_classes=5, hidden=(20, 12)).double()
    narrow = create_model("mlp", in_shape=(1, 8, 8), num_classes=5, hidden=(10, 6)).double()
    result = ot_fuse([wide, narrow], OTFusionConfig(base=1, ground_metric="weight"))
    assert result.model.arch["kwargs"]["hidden"] == (10, 6)
    assert all(p.dtype == torch.float64 for p in result.model.parameters())
    out = result.model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_fusion_weight_one_returns_that_model():
    a, b = trained_like("vgg", seed=0), trained_like("vgg", seed=1)
    x = probe_inputs("vgg")
    result = ot_fuse([a, b], OTFusionConfig(weights=[0.0, 1.0], base=0), probe=x)
    # all mass on b, aligned onto a's neuron order: b's function
    torch.testing.assert_close(result.model(x), b(x), atol=1e-5, rtol=0)


def test_networks_of_different_depth_are_refused_by_plain_ot():
    a = create_model("mlp", in_shape=(1, 8, 8), hidden=(8, 8, 8))
    b = create_model("mlp", in_shape=(1, 8, 8), hidden=(8, 8))
    with pytest.raises(UnsupportedNetwork, match="use CLAFusion"):
        ot_fuse([a, b], probe=torch.rand(4, 1, 8, 8))


def test_network_outside_the_registry_is_traced_given_its_input_shape():
    with pytest.raises(UnsupportedNetwork, match="SmallCNN: give the input shape"):
        fusion_spec(create_model("small_cnn"))
    spec = fusion_spec(create_model("small_cnn", width=8), (1, 28, 28))
    assert [len(g.producers) for g in spec.groups] == [1] * 5  # 4 convolutions, 1 linear


def test_bad_configuration_names_the_field():
    models = [create_model("mlp"), create_model("mlp")]
    with pytest.raises(ValueError, match=r"plan\n.*'emd' or 'sinkhorn'"):
        OTFusionConfig(plan="hungarian")
    with pytest.raises(ValueError, match="weights: 3 given for 2 models"):
        ot_fuse(models, OTFusionConfig(weights=[1, 1, 1]))
    with pytest.raises(ValueError, match="needs probe inputs"):
        ot_fuse(models, OTFusionConfig(ground_metric="activation"))


# ---- transport plans --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["emd", "sinkhorn"])
def test_transport_plan_marginals_and_dtype(method):
    cost = torch.rand(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    plan = transport_plan(cost, method=method, reg=0.1)
    assert plan.dtype == torch.float32 and plan.shape == (7, 4)
    torch.testing.assert_close(plan.sum(1), torch.full((7,), 1 / 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 1 / 4), atol=1e-4, rtol=0)


def test_emd_recovers_a_permutation():
    points = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    plan = transport_plan(torch.cdist(points[order], points))
    assert torch.equal(plan.argmax(dim=1), order)


def test_sinkhorn_non_convergence_warns():
    cost = torch.rand(30, 30, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="did not converge"):
        transport_plan(cost, method="sinkhorn", reg=1e-4)


def test_transport_plan_rejects_unknown_method_and_nan():
    with pytest.raises(ValueError, match="method='exact'"):
        transport_plan(torch.rand(2, 2), method="exact")
    with pytest.raises(ValueError, match="NaN"):
        transport_plan(torch.tensor([[0.0, math.nan], [1.0, 0.0]]))


def test_apply_transport_handles_flattened_channels():
    # a linear layer reading (C=3, h*w=4) flattened maps: the channel blocks move together
    weight = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)
    swap = torch.eye(3)[[2, 0, 1]]  # A's channel i -> B's channel j where swap[i, j] = 1
    moved = apply_transport(weight, 1, swap)
    expected = weight.reshape(2, 3, 4)[:, [1, 2, 0]].reshape(2, 12)
    torch.testing.assert_close(moved, expected)


# ---- CKA --------------------------------------------------------------------------------


def test_linear_cka_properties():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    assert float(linear_cka(x, x)) == pytest.approx(1.0)
    assert float(linear_cka(x, x @ rotation * 3.7)) == pytest.approx(1.0)
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(x @ rotation, 0.1 * y)))
    assert 0.0 < float(linear_cka(x, y)) < 1.0
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)))


def test_cka_from_grams_equals_cka_from_activations():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 4, 4, generator=generator)  # conv maps are flattened per sample
    y = torch.relu(x.flatten(1) @ torch.randn(48, 9, generator=generator))
    from_grams = cka_from_grams(centered_gram(x), centered_gram(y))
    assert from_grams.dtype == torch.float32
    assert float(from_grams) == pytest.approx(float(linear_cka(x, y)), abs=1e-5)


def test_cka_of_a_constant_layer_is_zero_not_nan():
    x = torch.randn(10, 4)
    assert float(linear_cka(x, torch.ones(10, 3))) == 0.0
    assert float(cka_from_grams(centered_gram(x), centered_gram(torch.ones(10, 3)))) == 0.0


def test_layer_grams_match_layer_outputs():
    model = trained_like("mlp")
    x = probe_inputs("mlp")
    outputs = layer_outputs(model, x, ["body.1", "body.3"])
    grams = layer_grams(model, x, ["body.1", "body.3"])
    assert outputs["body.1"].shape == (32, 24)
    assert (outputs["body.1"] < 0).any()  # pre-activations, not the in-place ReLU's output
    torch.testing.assert_close(grams["body.3"], centered_gram(outputs["body.3"]))
    with pytest.raises(KeyError, match="'nope'"):
        layer_outputs(model, x, ["nope"])


# ---- cross-layer alignment ----------------------------------------------------------------


def _brute_force(cost: torch.Tensor) -> float:
    m, n = cost.shape
    best = math.inf
    for middle in itertools.combinations(range(1, m - 1), n - 2):
        mapping = (0, *middle, m - 1)
        best = min(best, sum(float(cost[j, i]) for i, j in enumerate(mapping)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_alignment_is_optimal_and_strictly_increasing(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 5, (1,), generator=generator))
    m = n + int(torch.randint(0, 4, (1,), generator=generator))
    cost = torch.rand(m, n, generator=generator)
    mapping = cross_layer_alignment(cost)
    assert len(mapping) == n and mapping[0] == 0 and mapping[-1] == m - 1
    assert all(b > a for a, b in zip(mapping, mapping[1:]))
    total = sum(float(cost[j, i]) for i, j in enumerate(mapping))
    assert total == pytest.approx(_brute_force(cost))


def test_alignment_reproduces_the_papers_toy_example():
    # Fig. 2: A has hidden layers of 5, 4, 3, 1 neurons, B of 3, 2, 1; cost = squared difference
    cost = torch.tensor([[float((a - b) ** 2) for b in (3, 2, 1)] for a in (5, 4, 3, 1)])
    assert cross_layer_alignment(cost) == [0, 2, 3]  # the paper's a = [1, 3, 4], 1-based


def test_alignment_edge_cases():
    assert cross_layer_alignment(torch.rand(4, 1)) == [0]
    assert cross_layer_alignment(torch.rand(3, 3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="deeper network first"):
        cross_layer_alignment(torch.rand(2, 3))


# ---- layer balancing ---------------------------------------------------------------------


INSERTIONS = {
    "mlp": {"hidden": [0, 1, 1]},
    "vgg": {"stage0": [0], "stage1": [1], "fc": [0]},
    "resnet": {"stage0": [0], "stage1": [0, 0], "stage2": [0]},
}


@pytest.mark.parametrize("kind", sorted(NETWORKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adding_identity_units_preserves_function_dtype_and_depth(kind, dtype):
    model = trained_like(kind).to(dtype)
    deeper = add_identity_units(model, INSERTIONS[kind])
    added = sum(len(v) for v in INSERTIONS[kind].values())
    sections = lambda m: sum(len(s.units) for s in fusion_spec(m).sections)  # noqa: E731
    assert sections(deeper) == sections(model) + added
    assert all(p.dtype == dtype for p in deeper.parameters())
    assert not deeper.training
    x = probe_inputs(kind).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(deeper(x), model(x), atol=1e-6, rtol=1e-6)


def test_identity_kernels_of_any_odd_size():
    from amalgam.fusion.ot.balance import identity_kernel

    x = torch.randn(2, 3, 9, 9)
    for size in (1, 3, 5):
        for groups in (1, 3):  # full and depthwise
            kernel = identity_kernel(torch.empty(3, 3 // groups, size, size))
            out = torch.nn.functional.conv2d(x, kernel, padding=size // 2, groups=groups)
            torch.testing.assert_close(out, x)
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(torch.empty(3, 3, 2, 2))


def test_merging_is_exact_where_the_firing_estimate_is():
    torch.manual_seed(0)
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=3, hidden=(10, 10, 10)).eval()
    with torch.no_grad():
        model.body[3].bias.fill_(100.0)  # hidden layer 1 fires on every input
    x = torch.randn(20, 1, 8, 8)
    z = layer_outputs(model, x, ["body.3"])["body.3"]
    assert (z > 0).all()
    for sign in ("sum", "vote", "average"):
        merged = merge_hidden_layers(model, [1], {1: z}, sign)
        assert merged.arch["kwargs"]["hidden"] == (10, 10)
        torch.testing.assert_close(merged(x), model(x), atol=1e-3, rtol=1e-5)


def test_firing_estimates():
    z = torch.tensor([[1.0, -1.0, -5.0], [1.0, -1.0, 1.0], [-0.5, 1.5, 1.0]])
    torch.testing.assert_close(firing_estimate(z, "sum"), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(firing_estimate(z, "vote"), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(firing_estimate(z, "average"), torch.tensor([2, 1, 2]) / 3)
    with pytest.raises(ValueError, match="sign='max'"):
        firing_estimate(z, "max")


def test_merging_refuses_convolutional_networks():
    with pytest.raises(UnsupportedNetwork, match="MLPs only"):
        merge_hidden_layers(trained_like("vgg"), [0], {})


# ---- CLAFusion -----------------------------------------------------------------------------


def test_clafusion_of_a_network_and_its_deepened_permuted_copy():
    # B = A with an identity layer added and its neurons permuted: CLA must map B's layers to
    # A's real ones, and the fused network must compute A's function.
    model = trained_like("mlp")
    deeper = _permuted_copy(add_identity_units(model, {"hidden": [1]}))
    x = probe_inputs("mlp", count=64)
    result = clafusion([model, deeper], x, OTFusionConfig(balance="add"))
    assert result.base == 0  # the shallower network, deepened
    assert result.alignments["hidden"][1] == [0, 1, 3]
    assert result.model.arch["kwargs"]["hidden"] == (24, 16, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=0)


def test_clafusion_merge_keeps_the_shallow_structure():
    a = trained_like("mlp")
    torch.manual_seed(5)
    b = create_model("mlp", in_shape=(1, 8, 8), num_classes=5, hidden=(24, 16)).eval()
    result = clafusion([a, b], probe_inputs("mlp"), OTFusionConfig(balance="merge", sign="average"))
    assert result.base == 1
    assert result.model.arch["kwargs"]["hidden"] == (24, 16)
    assert result.alignments["hidden"][0] == [0, 2]
    assert result.cka["hidden"][0].shape == (3, 2)


def test_clafusion_resnets_of_different_depth():
    shallow = trained_like("resnet")
    torch.manual_seed(1)
    deep = create_model("resnet14_cifar", in_shape=(3, 16, 16), num_classes=5).eval()
    x = probe_inputs("resnet")
    result = clafusion([shallow, deep], x, OTFusionConfig(base=1))
    assert result.base == 1 and result.model.arch["name"] == "resnet14_cifar"
    assert [m.blocks for m in result.balanced] == [(2, 2, 2), (2, 2, 2)]
    assert torch.isfinite(result.model(x)).all()


def test_clafusion_grows_the_base_where_another_network_is_deeper():
    torch.manual_seed(0)
    a = create_model(
        "vgg_cnn", in_shape=(3, 16, 16), num_classes=5, stages=((6, 6), (8,)), fc=(12,)
    )
    b = create_model(
        "vgg_cnn", in_shape=(3, 16, 16), num_classes=5, stages=((6,), (8, 8)), fc=(12,)
    )
    result = clafusion([a.eval(), b.eval()], probe_inputs("vgg"))
    assert result.model.stage_widths == ((6, 6), (8, 8))


@pytest.mark.parametrize("kind", ["mlp", "vgg"])
def test_a_model_mapped_onto_a_wider_base_with_all_the_weight(kind):
    # widths differ: each base neuron becomes the barycentre of the model's neurons coupled to
    # it -- with twice the width, a copy of one of them (checked on the first layer, whose
    # inputs need no mapping; deeper layers read the copies with OTFusion's averaged weights)
    narrow = trained_like(kind)
    torch.manual_seed(3)
    kwargs = dict(NETWORKS[kind])
    name = kwargs.pop("name")
    if kind == "mlp":
        kwargs["hidden"] = tuple(2 * w for w in kwargs["hidden"])
    else:
        kwargs["stages"] = tuple(tuple(2 * w for w in s) for s in kwargs["stages"])
        kwargs["fc"] = tuple(2 * w for w in kwargs["fc"])
    wide = create_model(name, num_classes=5, **kwargs).eval()
    config = OTFusionConfig(weights=[1.0, 0.0], base=1, ground_metric="weight")
    result = ot_fuse([narrow, wide], config)
    assert result.model.state_dict()[fusion_spec(wide).groups[0].producers[0]].shape[0] == (
        2 * narrow.state_dict()[fusion_spec(narrow).groups[0].producers[0]].shape[0]
    )
    x = probe_inputs(kind)
    first = fusion_spec(narrow).groups[0].probe
    ours = layer_outputs(result.model, x, [first])[first].transpose(0, 1).flatten(1)
    theirs = layer_outputs(narrow, x, [first])[first].transpose(0, 1).flatten(1)
    nearest = torch.cdist(ours, theirs, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert nearest.values.max() < 1e-4
    assert torch.bincount(nearest.indices).tolist() == [2] * len(theirs)  # each copied twice


def test_recompute_batchnorm_matches_the_data():
    model = trained_like("vgg")
    x = probe_inputs("vgg", count=64) * 3 + 1
    recompute_batchnorm(model, x, batch_size=64)
    bn = model.stages[0][0].bn
    conv_out = model.stages[0][0].conv(x)
    torch.testing.assert_close(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=0)
    assert bn.momentum == 0.1 and not model.training


def test_networks_with_other_inputs_are_refused_before_any_work():
    a = create_model("mlp", in_shape=(1, 8, 8), hidden=(8, 8))
    b = create_model("mlp", in_shape=(1, 28, 28), hidden=(8,))
    with pytest.raises(UnsupportedNetwork, match=r"model 1: input shape \(1, 28, 28\) differs"):
        clafusion([a, b], torch.rand(4, 1, 8, 8))
    with pytest.raises(UnsupportedNetwork, match=r"model 1: 3 sections .* model 0 has 1"):
        clafusion([a, create_model("small_cnn", in_shape=(1, 8, 8))], torch.rand(4, 1, 8, 8))


def test_probe_uses_supplied_answers_and_computes_the_rest():
    model = trained_like("mlp")
    x = probe_inputs("mlp")
    probe = Probe(x)
    supplied = torch.eye(32)  # not what the model would give: proves it is used as is
    probe.supply(model, "grams", {"body.1": supplied})
    grams = probe.grams(model, ["body.1", "body.3"])
    assert grams["body.1"] is supplied
    torch.testing.assert_close(grams["body.3"], layer_grams(model, x, ["body.3"])["body.3"])
    other = trained_like("mlp", seed=1)  # another network: nothing supplied for it
    assert not torch.equal(probe.grams(other, ["body.1"])["body.1"], supplied)
    with pytest.raises(ValueError, match="kind='logits'"):
        probe.supply(model, "logits", {})

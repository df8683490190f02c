"""fusion/ot/repair: REPAIR gives a fused network's channels the inputs' statistics."""

from __future__ import annotations

import pytest
import torch
from networks import NETWORKS, probe_inputs, trained_like
from permuted import permuted_copy

from amalgam.fusion.models import create_model
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import ot_fuse
from amalgam.fusion.ot.repair import repair, repair_points, statistics_at
from amalgam.fusion.ot.spec import fusion_spec

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_repair_points_are_batchnorms_and_unnormalised_hidden_layers():
    vgg, mlp = trained_like("vgg", 0), trained_like("mlp", 0)
    # the conv layers' channels at their BatchNorm, the hidden linear layer at its output;
    # the classifier's outputs are the classes: never rescaled
    assert repair_points(vgg, fusion_spec(vgg)) == [
        "stages.0.0.bn", "stages.1.0.bn", "stages.1.1.bn", "fc.1"
    ]  # fmt: skip
    assert repair_points(mlp, fusion_spec(mlp)) == ["body.1", "body.3", "body.5"]


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_repairing_the_fusion_of_a_permuted_pair_changes_nothing(kind):
    model = trained_like(kind, 0)
    x = probe_inputs(kind, count=64)
    result = ot_fuse([model, permuted_copy(model, fusion_spec(model))], probe=x)
    corrected = repair(result.model, result.aligned_models(), x)
    assert corrected == repair_points(model, fusion_spec(model))
    torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_repaired_channels_take_the_interpolated_statistics(kind):
    """Eq. 4 of the REPAIR paper: each fused channel's mean and standard deviation on the
    probe are the fusion-weighted means of the aligned inputs'."""
    models, x, weights = (
        [trained_like(kind, 0), trained_like(kind, 1)],
        probe_inputs(kind, count=64),
        [0.3, 0.7],
    )
    result = ot_fuse(models, OTFusionConfig(weights=weights), probe=x)
    aligned = result.aligned_models()
    points = repair_points(result.model, fusion_spec(result.model))
    before = statistics_at(result.model, x, points)
    repair(result.model, aligned, x, weights)
    after = statistics_at(result.model, x, points)
    inputs = [statistics_at(m, x, points) for m in aligned]
    assert set(after) == set(points)
    for point in points:
        for i in (0, 1):  # mean, standard deviation
            target = weights[0] * inputs[0][point][i] + weights[1] * inputs[1][point][i]
            torch.testing.assert_close(after[point][i], target, atol=1e-4, rtol=1e-3)
    # averaging unrelated neurons shrinks them: the deepest repaired layer had lost variance
    last = points[-1]
    assert before[last][1].mean() < after[last][1].mean()


def test_aligned_inputs_keep_their_function():
    """What REPAIR measures: the inputs' own functions, in the fused network's order."""
    kind = "resnet"
    models, x = [trained_like(kind, 0), trained_like(kind, 1)], probe_inputs(kind, count=64)
    result = ot_fuse(models, probe=x)
    for model, aligned in zip(models, result.aligned_models(), strict=True):
        torch.testing.assert_close(aligned(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_model_left_out_of_an_iterative_fusion_is_still_aligned_for_repair():
    """Weight 0 in ``iterative`` mode: not averaged, but aligned, so REPAIR can read it even
    where its widths differ from the base's."""
    x = probe_inputs("mlp", count=64)
    wider = create_model("mlp", in_shape=(1, 8, 8), num_classes=5, hidden=(30, 20, 14)).eval()
    models = [trained_like("mlp", 0), trained_like("mlp", 1), wider]
    config = OTFusionConfig(mode="iterative", weights=[1.0, 1.0, 0.0])
    result = ot_fuse(models, config, probe=x)
    aligned = result.aligned_models()
    assert [m.body[1].out_features for m in aligned] == [24, 24, 24]
    assert repair(result.model, aligned, x, config.weights) == ["body.1", "body.3", "body.5"]

"""Knowledge amalgamation's parts (paper 004): the feature auto-encoder (Eq. 4), DFA and IFA,
the student's layer-wise steps (Eq. 3 and 5), score-vector concatenation and the test-time
merge of overlapping classes, and the coordinator's feature cache."""

from __future__ import annotations

import pytest
import torch
from parties import tiny_handler

from amalgam.fusion.activations import layer_names
from amalgam.fusion.amalgamation.autoencoder import (
    AutoencoderConfig,
    FeatureAutoencoder,
    amalgamate_features,
    half_squared_error,
)
from amalgam.fusion.amalgamation.features import FeatureCache
from amalgam.fusion.amalgamation.scores import (
    entries,
    merge_entries,
    part_weights,
    score_targets,
)
from amalgam.fusion.amalgamation.student import (
    Layout,
    build_student,
    fold_adaptation,
    layer_steps,
    student_width,
)
from amalgam.fusion.labels import union_classes
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _low_rank_features(t: int, channels: int, rank: int, seed: int = 0) -> torch.Tensor:
    """(t, channels, 4, 4) features spanned by ``rank`` channel directions, plus an offset."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(t, rank, 4, 4, generator=generator)
    mixing = torch.randn(channels, rank, generator=generator)
    offset = torch.randn(channels, 1, 1, generator=generator)
    return torch.einsum("cr,trhw->tchw", mixing, codes) + offset


def test_autoencoder_training_lowers_the_reconstruction_loss_and_keeps_shapes():
    features = _low_rank_features(128, 12, 4)
    torch.manual_seed(0)
    autoencoder = FeatureAutoencoder(12, 6, spatial=True)
    history = fit(autoencoder, features, features, epochs=20, batch_size=32, lr=1e-2,
                  weight_decay=0.0, progress=False, loss=half_squared_error)  # fmt: skip
    assert history[-1] < 0.5 * history[0]
    assert autoencoder.encode(features).shape == (128, 6, 4, 4)
    assert autoencoder(features).shape == features.shape


def test_amalgamation_compresses_to_the_students_width_exactly_when_the_rank_allows():
    first, second = _low_rank_features(64, 8, 3, seed=1), _low_rank_features(64, 8, 3, seed=2)
    result = amalgamate_features([first, second], 6, "dfa", AutoencoderConfig(epochs=0))
    assert result.features.shape == (64, 6, 4, 4) and result.features.dtype == torch.float16
    assert result.losses[0] < 1e-4  # rank 6 in 16 channels: the PCA start is exact
    narrow = amalgamate_features([first, second], 4, "dfa", AutoencoderConfig(epochs=0))
    assert 0.05 < narrow.losses[0] < 1.0  # two directions are lost


def test_dfa_trains_one_autoencoder_and_ifa_one_per_added_teacher_seeded():
    sets = [_low_rank_features(32, 4, 2, seed=k) for k in range(3)]
    config = AutoencoderConfig(epochs=2, batch_size=16)
    dfa = amalgamate_features(sets, 5, "dfa", config, progress=False)
    ifa = amalgamate_features(sets, 5, "ifa", config, progress=False)
    assert len(dfa.losses) == 1 and len(ifa.losses) == 2
    assert dfa.features.shape == ifa.features.shape == (32, 5, 4, 4)
    again = amalgamate_features(sets, 5, "ifa", config, progress=False)
    assert torch.equal(again.features, ifa.features)
    vectors = [torch.randn(20, 6), torch.randn(20, 6)]
    assert amalgamate_features(vectors, 8, "dfa", config, progress=False).features.shape == (20, 8)


def test_features_of_other_spatial_sizes_are_refused():
    with pytest.raises(ValueError, match="shapes differ beyond the channels"):
        amalgamate_features([torch.zeros(4, 2, 4, 4), torch.zeros(4, 2, 2, 2)], 3)


def _teacher():
    torch.manual_seed(0)
    return create_model("vgg_cnn", in_shape=(1, 8, 8), num_classes=3, stages=((4,), (6, 6)),
                        fc=(10,))  # fmt: skip


def test_layout_of_a_vgg_and_the_layers_it_must_release():
    layout = Layout.from_layer_names(layer_names(_teacher()))
    assert layout == Layout((1, 2), 1)
    assert layout.layers == ["stages.0.0.bn", "stages.1.0.bn", "stages.1.1.bn", "fc.1"]
    with pytest.raises(ValueError, match=r"does not release layer stages.1.0.bn"):
        Layout.from_layer_names(["stages.0.0.bn", "stages.1.1.bn"])
    with pytest.raises(ValueError, match="no vgg_cnn conv layer"):
        Layout.from_layer_names(["body.0", "head"])


def test_student_width_lies_between_the_widest_teacher_and_the_sum():
    assert student_width([16, 16], 0.9) == 20  # 0.9 * sqrt(512) = 20.4 -> a multiple of 4
    assert student_width([16, 16, 16, 16], 0.9) == 28 and student_width([8, 8], 0.9) == 10
    assert student_width([4, 4], 0.1) == 4 and student_width([4, 4], 5.0) == 8


def test_chained_layer_steps_compute_the_student():
    student = build_student(Layout((1, 2), 1), [5, 7, 7, 9], (1, 8, 8), 6).eval()
    x = torch.rand(3, 1, 8, 8)
    features = x
    steps = layer_steps(student)
    assert [s.target for s in steps] == [*Layout((1, 2), 1).layers, "scores"]
    for step in steps:
        features = step(features)
    assert torch.allclose(features, student(x))


def test_a_layer_wise_step_updates_only_its_layer_and_the_previous_adaptation():
    student = build_student(Layout((1, 2), 1), [5, 7, 7, 9], (1, 8, 8), 6)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    step = layer_steps(student)[2]  # stages.1.1: input the amalgamated stages.1.0 features
    previous, target = torch.randn(40, 7, 4, 4), torch.randn(40, 7, 4, 4)
    fit(step, previous, target, epochs=2, batch_size=8, weight_decay=0.0, progress=False,
        loss=half_squared_error)  # fmt: skip
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("stages.1.0.adapt", "stages.1.1.")) for k in changed)
    assert any(k.startswith("stages.1.0.adapt") for k in changed)
    assert any(k.startswith("stages.1.1.conv") for k in changed)


def test_score_vectors_concatenate_and_overlapping_classes_merge_at_test_time():
    classes = [["cat", "dog"], ["dog", "eel"]]
    assert entries(classes) == ["cat", "dog", "dog", "eel"]
    assert union_classes(classes) == ["cat", "dog", "eel"]
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.8, 0.1, 0.0, 0.7], [0.0, 0.5, 0.4, 0.6]])
    merged = merge_entries(scores, entries(classes), union_classes(classes))
    assert torch.equal(merged, torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.1, 0.7], [0.0, 0.5, 0.6]]))
    assert merged.argmax(dim=1).tolist() == [1, 0, 2]
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    per_teacher = score_targets(logits, "per_teacher", 1.0)
    assert torch.allclose(per_teacher.sum(dim=1), torch.ones(1))
    assert torch.allclose(per_teacher[0, :2], torch.softmax(logits[0][0], 0) / 2)
    concat = score_targets(logits, "concat", 1.0)
    assert torch.allclose(concat, torch.softmax(torch.tensor([[2.0, 0.0, 0.0, 4.0]]), dim=1))
    assert torch.equal(score_targets(logits, "logits", 3.0), torch.tensor([[2.0, 0, 0, 4]]))


def test_routed_targets_follow_each_teachers_own_confidence_whatever_its_scale():
    # teacher 0 is sure on images 0-3 (its part), teacher 1 on images 4-7, but teacher 1's
    # logits are ten times larger everywhere: one softmax over the concatenated logits hands
    # it every image, the part weights do not
    generator = torch.Generator().manual_seed(0)
    sure, unsure = torch.tensor([4.0, 0.0, 0.0]), torch.tensor([1.0, 0.8, 0.6])
    mine = torch.arange(8) < 4
    first = torch.where(mine[:, None], sure, unsure) + 0.1 * torch.rand(8, 3, generator=generator)
    second = 10 * (torch.where(mine[:, None], unsure[:2], sure[:2]))
    logits = [first, second]
    concat = score_targets(logits, "concat", 2.0)
    assert (concat[:, 3:].sum(dim=1) > 0.5).all()  # teacher 1 takes every image
    weights = part_weights(logits, 1.0)  # (8, 2)
    assert torch.allclose(weights.sum(dim=1), torch.ones(8))
    assert (weights[mine, 0] > 0.8).all() and (weights[~mine, 1] > 0.8).all()
    routed = score_targets(logits, "routed", 2.0, 1.0)
    assert torch.allclose(routed.sum(dim=1), torch.ones(8))
    assert torch.allclose(routed[:, :3], weights[:, :1] * torch.softmax(first / 2.0, dim=1))
    # a teacher's shift or scale does not move the weights; sharpness 0 is per_teacher
    assert torch.allclose(part_weights([first, 3 * second - 7], 1.0), weights, atol=1e-6)
    assert torch.allclose(score_targets(logits, "routed", 2.0, 0.0),
                          score_targets(logits, "per_teacher", 2.0))  # fmt: skip
    assert torch.allclose(part_weights([first[:1], second[:1]], 1.0), torch.full((1, 2), 0.5))


def test_the_cache_asks_once_and_answers_in_float16(tmp_path):
    policy = Policy(predict=PredictPolicy(), activations=LayersPolicy(layers=["*"]), max_batch=8,
                    sample_budget=None)  # fmt: skip
    handler = tiny_handler(tmp_path, policy, model=_teacher())
    teacher = LocalTeacher(handler)
    x = torch.rand(21, 1, 8, 8)
    cache = FeatureCache(tmp_path / "cache", wire_bytes=2)
    layers = ["stages.0.0.bn", "fc.1"]
    first = cache.fetch(teacher, x, layers, progress=False)
    expected = teacher.activations(x, layers)
    for layer in layers:
        assert first[layer].dtype == torch.float16
        assert torch.allclose(first[layer].float(), expected[layer], atol=1e-2, rtol=1e-2)
    per_sample = 4 * 8 * 8 + 10
    assert cache.bytes_moved["acme"] == 21 * per_sample * 2
    calls = len(handler.audit.path.read_text().splitlines())
    again = FeatureCache(tmp_path / "cache", wire_bytes=2).fetch(teacher, x, layers)
    assert len(handler.audit.path.read_text().splitlines()) == calls  # nothing asked
    assert torch.equal(again["fc.1"], first["fc.1"])
    other = cache.fetch(teacher, x[:5], layers, progress=False)
    assert other["fc.1"].shape == (5, 10)


def test_folding_the_adaptation_modules_keeps_the_function_and_drops_their_parameters():
    student = build_student(Layout((1, 2), 1), [5, 7, 7, 9], (1, 8, 8), 6)
    fit(student, torch.rand(64, 1, 8, 8), torch.randint(0, 6, (64,)), epochs=2, batch_size=16,
        progress=False)  # fmt: skip
    folded = fold_adaptation(student.eval())
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(folded(x), student(x), atol=1e-5)
    plain = build_student(Layout((1, 2), 1), [5, 7, 7, 9], (1, 8, 8), 6, adapt=False)
    assert folded.arch == plain.arch
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in plain.parameters())

"""Pseudo-label aggregation for detection (paper 000, Algorithm 2) on hand-made detections,
Soft-NMS, COCO export and mAP through pycocotools, the digit canvases, and the canvases of
mixed fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from amalgam.fusion.data import Dataset
from amalgam.fusion.detection.aggregate import (
    AggregationConfig,
    aggregate,
    aggregate_image,
    one_category_per_object,
    soft_nms,
)
from amalgam.fusion.detection.canvas import DetectionSet, make_canvases
from amalgam.fusion.detection.coco import _coco, evaluate_map, to_coco
from amalgam.fusion.detection.compose import finetune_set
from amalgam.fusion.teacher import Detections


def dets(*rows) -> Detections:
    """Detections from ``(x1, y1, x2, y2, category, score)`` rows."""
    if not rows:
        return Detections.empty()
    t = torch.tensor(rows, dtype=torch.float32)
    return Detections(t[:, :4], t[:, 4].long(), t[:, 5])


def rows(d: Detections) -> list[tuple]:
    return sorted(
        (tuple(round(v, 4) for v in box), int(c), round(s, 4))
        for box, c, s in zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist())
    )


A_BOX, B_BOX = (10, 10, 30, 40), (11, 11, 31, 41)  # the same object, IoU ~0.84
FAR = (50, 50, 60, 62)
ALL_KNOW = torch.ones(3, 3, dtype=torch.bool)  # 3 models x 3 categories


def two_agree_one_elsewhere() -> list[Detections]:
    return [dets((*A_BOX, 0, 0.9)), dets((*B_BOX, 0, 0.8)), dets((*FAR, 0, 0.7))]


def test_two_models_agreeing_and_one_alone_under_each_rule():
    per_model = two_agree_one_elsewhere()
    iou = float(box_iou(torch.tensor([A_BOX]).float(), torch.tensor([B_BOX]).float()))
    decayed_b = 0.8 * math.exp(-(iou**2) / 0.5)
    assert decayed_b < 0.3  # so Soft-NMS drops B's duplicate at 0.3 and the default 0.5
    unanimous = aggregate_image(per_model, ALL_KNOW, AggregationConfig(detection_rule="unanimous"))
    assert rows(unanimous) == []  # K = 2 < N = 3 and K = 1 < 3
    consensus = aggregate_image(per_model, ALL_KNOW, AggregationConfig(detection_rule="consensus"))
    assert rows(consensus) == [((10, 10, 30, 40), 0, 0.9)]  # K = 2 >= 3/2; the lone one goes
    affirmative = aggregate_image(
        per_model, ALL_KNOW, AggregationConfig(detection_rule="affirmative")
    )
    assert rows(affirmative) == [((10, 10, 30, 40), 0, 0.9), ((50, 50, 60, 62), 0, 0.7)]
    loose = AggregationConfig(
        detection_rule="affirmative", final_score=0.1
    )  # the duplicate survives
    assert rows(aggregate_image(per_model, ALL_KNOW, loose))[1] == (
        (11, 11, 31, 41), 0, round(decayed_b, 4)
    )  # fmt: skip


def test_a_category_only_one_model_knows_is_kept_by_every_rule():
    knows = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # only m2: cat 1
    per_model = [dets(), dets(), dets((*FAR, 1, 0.6))]
    for rule in ("unanimous", "consensus", "affirmative"):
        kept = aggregate_image(per_model, knows, AggregationConfig(detection_rule=rule))
        assert rows(kept) == [((50, 50, 60, 62), 1, 0.6)], rule


def test_overlapping_boxes_of_different_categories_keep_the_higher_score():
    per_model = [dets((*A_BOX, 0, 0.9)), dets((*B_BOX, 2, 0.8)), dets()]
    knows = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)  # N = 2 for both
    both = AggregationConfig(detection_rule="consensus", category_iou=None)
    kept = aggregate_image(per_model, knows, both)
    assert rows(kept) == [((10, 10, 30, 40), 0, 0.9), ((11, 11, 31, 41), 2, 0.8)]  # no decay
    labels, stats = aggregate([[d] for d in per_model], knows, AggregationConfig())
    assert rows(labels[0]) == [((10, 10, 30, 40), 0, 0.9)]  # one category per object
    assert (stats.kept_objects, stats.conflicts, stats.boxes) == (2, 1, 1)
    assert (
        rows(aggregate_image(per_model, knows, AggregationConfig(detection_rule="unanimous"))) == []
    )


def test_one_category_per_object_is_greedy_and_leaves_same_category_overlaps():
    found = dets(
        (0, 0, 10, 10, 0, 0.9),  # kept: the highest score
        (3, 0, 13, 10, 1, 0.8),  # IoU 0.54 with the first, another category: dropped
        (6, 0, 16, 10, 2, 0.7),  # IoU 0.54 with the dropped one, 0.25 with the first: kept
        (0, 0, 9, 10, 0, 0.6),  # IoU 0.9 with the first, its category: left to Soft-NMS
    )
    assert rows(one_category_per_object(found, 0.5)) == [
        ((0, 0, 9, 10), 0, 0.6), ((0, 0, 10, 10), 0, 0.9), ((6, 0, 16, 10), 2, 0.7)
    ]  # fmt: skip
    assert rows(one_category_per_object(found, 0.2)) == [
        ((0, 0, 9, 10), 0, 0.6), ((0, 0, 10, 10), 0, 0.9)
    ]  # fmt: skip


def test_votes_count_distinct_models_not_boxes():
    per_model = [dets((*A_BOX, 0, 0.9), (*B_BOX, 0, 0.85)), dets(), dets()]  # one model, twice
    kept = aggregate_image(per_model, ALL_KNOW, AggregationConfig(detection_rule="consensus"))
    assert rows(kept) == []  # K = 1 < 3/2


def test_the_confidence_filter_comes_before_the_vote():
    per_model = [dets((*A_BOX, 0, 0.9)), dets((*B_BOX, 0, 0.4)), dets()]
    strict = aggregate_image(per_model, ALL_KNOW, AggregationConfig(score_threshold=0.5))
    assert rows(strict) == []  # B's 0.4 is filtered, so only one model saw the object
    loose = aggregate_image(per_model, ALL_KNOW, AggregationConfig(score_threshold=0.3))
    assert rows(loose) == [((10, 10, 30, 40), 0, 0.9)]


def test_soft_nms_decays_scores_by_the_gaussian_of_iou():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.85, 0.5])
    keep, decayed = soft_nms(boxes, scores, sigma=0.5, final_score=0.01)
    assert keep.tolist() == [0, 2, 1]  # box 1 decays below the far box 2
    expected = 0.85 * math.exp(-(0.8**2) / 0.5)  # IoU(box0, box1) = 80 / 100
    assert decayed.tolist() == pytest.approx([0.9, 0.5, expected])
    keep, _ = soft_nms(boxes, scores, sigma=0.5, final_score=0.3)
    assert keep.tolist() == [0, 2]


def test_aggregate_counts_what_each_stage_and_rule_kept():
    labels, stats = aggregate([[d] for d in two_agree_one_elsewhere()], ALL_KNOW,
                              AggregationConfig())  # fmt: skip
    assert len(labels) == 1
    assert (stats.detections, stats.confident, stats.objects, stats.kept_objects) == (3, 3, 2, 1)
    assert stats.boxes == 1
    assert stats.per_rule == {"unanimous": 0, "consensus": 1, "affirmative": 2}


def test_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match=r"detection_rule\n.*'unanimous', 'consensus' or"):
        AggregationConfig(detection_rule="majority")


def test_coco_export_round_trips_through_pycocotools():
    labels = [dets((*A_BOX, 0, 1.0), (*FAR, 2, 1.0)), dets(), dets((1, 2, 5, 9, 1, 1.0))]
    coco = _coco(to_coco(labels, ["0", "1", "2"], size=64))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    back = []
    for image in (1, 2, 3):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image]))
        back.append(sorted((a["category_id"] - 1, *[round(v, 4) for v in (
            a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]
        )]) for a in anns))  # fmt: skip
    assert back == [[(0, 10, 10, 30, 40), (2, 50, 50, 60, 62)], [], [(1, 1, 2, 5, 9)]]


def test_map_is_one_for_the_truth_and_drops_for_shifted_boxes():
    truth = [dets((*A_BOX, 0, 1.0), (*FAR, 1, 1.0)), dets((1, 2, 21, 29, 1, 1.0))]
    perfect = evaluate_map(truth, truth, ["0", "1"], size=64)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["per_category"] == pytest.approx({"0": 1.0, "1": 1.0})
    shifted = [Detections(d.boxes + 3.0, d.labels, d.scores) for d in truth]
    worse = evaluate_map(truth, shifted, ["0", "1"], size=64)
    assert worse["map"] < 0.9
    assert evaluate_map(truth, [dets(), dets()], ["0", "1"], size=64)["map"] == 0.0


def _glyphs() -> Dataset:
    x = torch.zeros(4, 1, 8, 8)
    x[:, 0, 2:6, 3:5] = 1.0  # a bar in the middle of each glyph
    return Dataset(x, torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])


def test_canvases_are_deterministic_and_their_boxes_hold_all_the_ink():
    first = make_canvases(_glyphs(), 20, size=48, seed=3)
    again = make_canvases(_glyphs(), 20, size=48, seed=3)
    other = make_canvases(_glyphs(), 20, size=48, seed=4)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    for image, target in zip(first.images, first.targets):
        assert 1 <= len(target) <= 5
        assert (target.boxes >= 0).all() and (target.boxes <= 48).all()
        inside = torch.zeros_like(image[0], dtype=torch.bool)
        for x1, y1, x2, y2 in target.boxes.long().tolist():
            assert x2 > x1 and y2 > y1
            inside[y1:y2, x1:x2] = True
        assert float((image[0] * ~inside).max()) <= 0.25  # faint edges at most (INK)


@pytest.mark.parametrize("labelled_index, count", [([0, 2], 4), (None, 6)])
def test_mixed_finetuning_takes_the_labels_and_the_pseudo_labels_of_the_rest(labelled_index, count):
    unlabeled = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8)  # canvas k is all k
    pseudo = [dets((0, 0, 4, 4, k, 0.9)) for k in range(4)]
    truth = [dets((1, 1, 5, 5, 7, 1.0)), dets((2, 2, 6, 6, 8, 1.0))]
    labelled = DetectionSet(unlabeled[[0, 2]], truth, [str(d) for d in range(10)])
    mixed = finetune_set(unlabeled, pseudo, labelled, labelled_index)
    assert len(mixed) == count and len(mixed.targets) == count
    assert mixed.targets[:2] == truth  # the labels first, as they are
    rest = [int(image[0, 0, 0]) for image in mixed.images[2:]]
    assert rest == ([1, 3] if labelled_index else [0, 1, 2, 3])
    assert [int(t.labels[0]) for t in mixed.targets[2:]] == rest  # each with its pseudo-label


@pytest.mark.parametrize("share, repeats", [(None, 1), (0.25, 1), (0.5, 1), (0.6, 2), (0.9, 9)])
def test_mixed_finetuning_repeats_the_labels_to_their_share(share, repeats):
    unlabeled = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    pseudo = [dets((0, 0, 4, 4, k, 0.9)) for k in range(4)]
    truth = [dets((1, 1, 5, 5, 7, 1.0)), dets((2, 2, 6, 6, 8, 1.0))]
    labelled = DetectionSet(unlabeled[[0, 2]], truth, [str(d) for d in range(10)])
    mixed = finetune_set(unlabeled, pseudo, labelled, [0, 2], label_share=share)
    assert len(mixed) == 2 * repeats + 2 and mixed.targets[: 2 * repeats] == truth * repeats
    assert torch.equal(mixed.images[: 2 * repeats], labelled.images.repeat(repeats, 1, 1, 1))
    assert 2 * repeats / len(mixed) >= (share or 0)  # the share reached ...
    assert (
        repeats == 1 or 2 * (repeats - 1) / (2 * (repeats - 1) + 2) < share
    )  # ... and not by one repeat fewer


def test_a_label_share_outside_zero_to_one_is_refused():
    unlabeled = torch.zeros(2, 1, 8, 8)
    labelled = DetectionSet(unlabeled[:1], [dets((1, 1, 5, 5, 7, 1.0))], ["7"])
    with pytest.raises(ValueError, match=r"finetune_label_share: 1.0 is outside \[0, 1\)"):
        finetune_set(unlabeled, [dets()] * 2, labelled, [0], label_share=1.0)

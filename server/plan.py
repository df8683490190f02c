"""Which fusion methods the parties' policies allow, and why not (``amalgam plan job.yaml``).

Requirements follow DESIGN.md's table "What each method needs from a party".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from amalgam.fusion.amalgamation.student import Layout
from amalgam.fusion.teacher import TeacherInfo


def _vgg_layers(info: TeacherInfo) -> str | None:
    try:
        Layout.from_layer_names(info.layers)
    except ValueError as error:
        return f"activations {error}"
    return None


@dataclass(frozen=True)
class Need:
    capability: str
    output_forms: tuple[str, ...] = ()  # for predict: forms that serve the method
    batchnorm: bool = False  # the teacher must have BatchNorm layers
    layers: Callable[[TeacherInfo], str | None] | None = None  # what the released layers lack


METHOD_NEEDS: dict[str, tuple[tuple[Need, ...], ...]] = {
    # each method: a tuple of alternatives; each alternative: needs that must all hold
    "composition": ((Need("predict", ("probs", "logits", "topk", "label")),),),
    "consolidation": ((Need("predict", ("logits", "probs")),),),
    # ot / clafusion: CKA and activations are asked of parties that grant Gram / Activations,
    # and otherwise computed by the coordinator from the exported weights
    "ot": ((Need("weights"),),),
    "clafusion": ((Need("weights"),),),
    "data-free": ((Need("predict", ("logits",)), Need("bn_feedback", batchnorm=True)),),
    # DAFL and ZSKT train generators through input gradients alone, without BN statistics
    "data-free-no-bn": ((Need("predict", ("logits",)), Need("bn_feedback")),),
    # generators and assistants trained at the parties: Synthesize + Predict only
    "data-free-party": ((Need("predict", ("logits",)), Need("synthesize", batchnorm=True)),),
    # the features of every vgg_cnn layer, and the score vectors
    "amalgamate": (
        (Need("predict", ("logits", "probs")), Need("activations", layers=_vgg_layers)),
    ),
}


def _missing(info: TeacherInfo, needs: tuple[Need, ...]) -> list[str]:
    problems = []
    for need in needs:
        if need.capability not in info.capabilities:
            problems.append(f"{need.capability} is not granted")
        elif need.batchnorm and info.batchnorm_layers == 0:
            problems.append("the teacher has no BatchNorm layers")
        elif need.output_forms and info.output_form not in need.output_forms:
            problems.append(
                f"predict releases {info.output_form}, needs {' or '.join(need.output_forms)}"
            )
        elif need.layers is not None and (problem := need.layers(info)):
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class MethodPlan:
    method: str
    possible: bool
    reasons: tuple[str, ...]  # why not, one per party that blocks it


def plan(infos: Sequence[TeacherInfo]) -> list[MethodPlan]:
    """For every method, whether all parties allow it; otherwise each blocking party's reason."""
    plans = []
    for method, alternatives in METHOD_NEEDS.items():
        reasons = []
        for info in infos:
            per_alternative = [_missing(info, needs) for needs in alternatives]
            if all(per_alternative):
                reasons.append(f"{info.name}: {'; '.join(min(per_alternative, key=len))}")
        plans.append(MethodPlan(method, not reasons, tuple(reasons)))
    return plans

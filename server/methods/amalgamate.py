"""``amalgamate`` (paper 004): the parties' features and their score vectors on the
coordinator's unlabeled images become one student for the union of their classes -- a
``vgg_cnn`` of the teachers' depth (the paper's), or any network the student section names,
learned at the feature points it shares with the teachers; the report judges it against the
teachers and their ensemble."""

from __future__ import annotations

from pathlib import Path

from amalgam.fusion.amalgamation import (
    TARGETS,
    AmalgamationConfig,
    FeatureCache,
    Layout,
    amalgamate,
    amalgamation_rows,
    parameter_counts,
)
from amalgam.fusion.data import load_source
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import TeacherInfo
from amalgam.server.methods.base import Grants, Method, Need, Outcome
from amalgam.server.report import markdown_table


class AmalgamationParams(AmalgamationConfig):
    """Knowledge amalgamation; joint learning uses the job's ``student`` schedule."""

    half: bool = True  # float16 features on the wire


def _feature_layers(info: TeacherInfo) -> str | None:
    """What the party's released layers lack for amalgamation: the layers of a ``vgg_cnn``,
    or (for a student of any architecture) layers that end units of its network."""
    if info.feature_layers:
        return None
    try:
        Layout.from_layer_names(info.layers)
    except ValueError as error:
        return f"activations {error} and no layer that ends a unit of its network"
    return None


class Amalgamate(Method):
    name = "amalgamate"
    summary = "teachers' features and scores, layer by layer, in one compact student (paper 004)"
    params = AmalgamationParams
    # features at the ends of units (of every vgg_cnn layer), and the score vectors
    grants = (
        Grants((Need("predict", ("logits", "probs")), Need("activations", layers=_feature_layers))),
    )
    float16 = frozenset({"activations"})

    def check(self, spec) -> str | None:
        if len(spec.parties) < 2:
            return "parties: amalgamation needs two teachers or more"
        if spec.data.unlabeled is None:
            return "data.unlabeled: amalgamation needs unlabeled images"
        return None

    def run(self, spec, teachers, context: RunContext) -> Outcome:
        config, cache = spec.method.params, _feature_cache(spec)
        unlabeled, test = load_source(spec.data.unlabeled), load_source(spec.data.test)
        result = amalgamate(teachers, unlabeled.x, config, spec.student, cache, context)
        students = {"layerwise": result.layerwise, "joint": result.joint, **result.baselines}
        rows = amalgamation_rows(teachers, students, result.entries, test, context,
                                 config.routing_sharpness)  # fmt: skip
        infos = [t.info for t in teachers]
        params = parameter_counts(infos, result.widths, result.joint, spec.student.arch)
        scores = sum(len(unlabeled) * len(info.class_names) * 4 for info in infos)  # float32 logits
        moved = {
            "features": dict(cache.bytes_moved),
            "features_from_cache": dict(cache.bytes_reused),
            "scores": scores,
            "total": sum(cache.bytes_moved.values()) + scores,
        }
        names = [info.name for info in infos]
        width_rows = [
            [layer]
            + [_channels(result.layers[layer][name], w[name], layer) for name in names]
            + [str(w["student"])]
            for layer, w in result.widths.items()
        ]
        summary = [
            f"Unlabeled: {spec.data.unlabeled} ({len(unlabeled)} images; features of "
            f"{min(config.feature_samples, len(unlabeled))}); test: {spec.data.test}. "
            f"Feature amalgamation {config.scheme.upper()}; joint learning on "
            f"{TARGETS[config.score_target]} (T = {config.temperature}).",
            "",
            f"Channels per amalgamated layer of the student ({spec.student.arch}), and each "
            "party's layer amalgamated into it where its name differs:",
            "",
            markdown_table(["layer", *names, "student"], width_rows),
            "",
            f"Parameters: student {params['student']:,}"
            + (
                f", teachers together {params['teachers']:,} ("
                + ", ".join(f"{n} {params[f'teacher:{n}']:,}" for n in names)
                + ")."
                if "teachers" in params
                else " (the parties' networks are not known to the coordinator)."
            ),
            f"Moved to the coordinator: {moved['total'] / 1e6:.1f} MB ("
            f"features {sum(cache.bytes_moved.values()) / 1e6:.1f} MB in "
            f"{'float16' if spec.method.params.half else 'float32'}, score vectors "
            f"{scores / 1e6:.1f} MB); reused from the cache {cache.folder}: "
            f"{sum(cache.bytes_reused.values()) / 1e6:.1f} MB.",
            "Rows teacher:<party> are on the test images of the party's classes; <student>:part<k> "
            "the student on party k's images, choosing among party k's classes.",
        ]
        extra = {
            "params": params,
            "bytes_moved": moved,
            "widths": result.widths,
            "layers": result.layers,
            "entries": result.entries,
            "losses": result.losses,
            "parts": {f"part{k}": list(i.class_names) for k, i in enumerate(infos, start=1)},
        }
        return Outcome(result.joint, result.entries, rows, extra, summary)


def _channels(party_layer: str, channels: int, layer: str) -> str:
    return str(channels) if party_layer == layer else f"{channels} ({party_layer})"


def _feature_cache(spec) -> FeatureCache:
    """Kept beside the runs: a later job on the same images and parties asks nothing again."""
    folder = Path(spec.output_dir) / "cache" / "features"
    return FeatureCache(folder, wire_bytes=2 if spec.method.params.half else 4)


METHOD = Amalgamate()

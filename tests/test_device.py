"""The device plumbing, without a GPU.

Two stand-ins for an accelerator: a device whose tensors are float64 (a batch or model that
is not moved meets float32 weights or inputs, which a linear or convolution layer refuses,
as CUDA refuses a CPU tensor), and a default device of ``meta`` (a tensor made without the
run's device lands there and cannot mix with the run's tensors)."""

from __future__ import annotations

import pytest
import torch
import yaml

from amalgam.fusion.composition import CompositionConfig, compose
from amalgam.fusion.data import load_source
from amalgam.fusion.datafree import DataFreeConfig, DataFreeFusion
from amalgam.fusion.device import Hardware, resolve_device
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, fit, predict_logits
from amalgam.party.local import LocalTeacher
from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import BnFeedbackPolicy, Policy, PredictPolicy
from amalgam.server.job import load_job
from amalgam.server.simulation.parties import local_party

DIGITS = [str(d) for d in range(10)]


class Float64Device(Hardware):
    """An accelerator stand-in: what is placed on it becomes float64."""

    def place(self, model):
        return model.double()

    def put(self, tensor):
        return tensor.double() if tensor.is_floating_point() else tensor


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device")
    policy = Policy(predict=PredictPolicy(output="logits"), bn_feedback=BnFeedbackPolicy(),
                    sample_budget=None)  # fmt: skip
    made = []
    for i in range(2):
        data = load_source(f"digits:private-{i}")
        torch.manual_seed(i)
        model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=8)
        fit(model, data.x, data.y, epochs=15, batch_size=32, progress=False)
        made.append(LocalTeacher(local_party(f"p{i}", model, DIGITS, (1, 8, 8), policy, folder)))
    return made


def test_a_composition_runs_where_its_hardware_puts_it(teachers):
    unlabeled, test = load_source("digits:public"), load_source("digits:test")
    student = StudentConfig(epochs=2, batch_size=32)
    context = RunContext(progress=False, hardware=Float64Device())
    config = CompositionConfig(finetune_fraction=0.1)
    result = compose(teachers, unlabeled, test, config, student, context)
    assert {p.dtype for p in result.student.parameters()} == {torch.float64}
    assert {"student", "vanilla_kd", "supervised"} <= set(result.results)
    on_host = compose(teachers, unlabeled, test, config, student, RunContext(progress=False))
    for row in ("student", "vanilla_kd", "supervised"):  # the same run, in another precision
        assert result.results[row] == pytest.approx(on_host.results[row], abs=0.05)


def test_a_datafree_run_keeps_generators_assistants_and_student_on_its_hardware(teachers):
    config = DataFreeConfig(variant="dfmf", warmup=2, iterations=3, student_steps=2,
                            batch_size=16, generator_width=8)  # fmt: skip
    context = RunContext(progress=False, hardware=Float64Device())
    result = DataFreeFusion(teachers, config, context=context).run()
    assert {p.dtype for p in result.student.parameters()} == {torch.float64}
    assert {p.dtype for g in result.generators for p in g.parameters()} == {torch.float64}
    assert {s.dtype for snapshot in result.samples for s in snapshot} == {torch.float32}
    logits = predict_logits(result.student, load_source("digits:test").x[:8])
    assert logits.dtype == torch.float32 and logits.shape == (8, 10)


def test_training_makes_no_tensor_outside_the_runs_device():
    data = load_source("digits:private-0")
    torch.manual_seed(0)
    model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=8)
    with torch.device("meta"):  # anything made without the run's device lands here
        history = fit(model, data.x[:64], data.y[:64], epochs=2, batch_size=16, progress=False)
        logits = predict_logits(model, data.x[:8])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert logits.device.type == "cpu" and logits.shape == (8, 10)


def test_devices_resolve_or_are_refused_in_one_line():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"^cuda:{count} is not present: this machine has"):
        resolve_device(f"cuda:{count}")
    with pytest.raises(ValueError, match=r"^precision: fp16 autocast needs a GPU"):
        Hardware(torch.device("cpu"), "fp16")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"device": "cuda:7"}, r"device: cuda:7 is not present"),
        ({"device": "tpu"}, r"device: 'tpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
        ({"student": {"arch": "resnet1800"}}, r"student\.arch: unknown architecture 'resnet1800'"),
        ({"student": {"init": "nowhere.safetensors"}}, r"student\.init: .*nowhere\.safetensors"),
        ({"data": {"unlabeled": "digits:public", "test": "empty/"}}, r"data\.test: "),
    ],
)
def test_bad_hardware_student_and_data_stop_a_job_file_in_one_line(tmp_path, section, message):
    (tmp_path / "empty").mkdir()
    job = {
        "name": "j",
        "parties": [{"name": "a", "address": "127.0.0.1:1"}],
        "method": {"name": "composition"},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        **section,
    }
    job["data"] = {k: str(tmp_path / v) if v.endswith("/") else v for k, v in job["data"].items()}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=message) as raised:
        load_job(path)
    assert "\n" not in str(raised.value)


def test_a_party_answers_every_capability_without_tensors_outside_its_device(tmp_path):
    from amalgam.fusion.teacher import GeneratorObjective
    from amalgam.protocol.schemas import LayersPolicy

    torch.manual_seed(0)
    model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=8)
    policy = Policy(predict=PredictPolicy(output="probs"), bn_feedback=BnFeedbackPolicy(),
                    gram=LayersPolicy(layers=["*"]), sample_budget=None)  # fmt: skip
    handler = local_party("p", model, DIGITS, (1, 8, 8), policy, tmp_path)
    x = torch.rand(6, 1, 8, 8)
    objective = GeneratorObjective(batch_entropy=1.0, adversarial=1.0)
    with torch.device("meta"):  # anything made without the party's device lands here
        probs = handler.predict(x, "c")
        feedback = handler.bn_feedback(x, "c", objective, adversary_logits=torch.randn(6, 10,
                                       device="cpu"))  # fmt: skip
        grams = handler.layers(x, ["penultimate"], "c", gram=True)
    assert probs.device.type == "cpu" and torch.allclose(probs.sum(dim=1), torch.ones(6))
    assert feedback.input_grad.shape == x.shape and feedback.losses["bn"] > 0
    assert grams["penultimate"].shape == (6, 6)


def test_a_fused_network_is_fine_tuned_where_its_hardware_puts_it(tmp_path):
    from amalgam.fusion.ot import WeightFusionParams, fuse_parties
    from amalgam.protocol.schemas import WeightsPolicy

    policy = Policy(predict=PredictPolicy(output="logits"), weights=WeightsPolicy(),
                    sample_budget=None)  # fmt: skip
    parties = []
    for shard in range(2):
        torch.manual_seed(shard)
        model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, hidden=(16, 8))
        parties.append(LocalTeacher(local_party(f"p{shard}", model, DIGITS, (1, 8, 8), policy,
                                                tmp_path)))  # fmt: skip
    params = WeightFusionParams(ground_metric="weight", recompute_batchnorm=False,
                                finetune_epochs=1)  # fmt: skip
    fused = fuse_parties(parties, params, load_source("digits:test"),
                         finetune=load_source("digits:public"),
                         context=RunContext(progress=False, hardware=Float64Device()))  # fmt: skip
    assert {p.dtype for p in fused.networks["student"].parameters()} == {torch.float64}
    assert {p.dtype for p in fused.networks["fused_one_shot"].parameters()} == {torch.float32}
    assert 0 <= fused.rows["student"] <= 1


def test_a_consolidated_student_trains_and_is_probed_where_its_hardware_puts_it(tmp_path):
    from amalgam.fusion.consolidation import ConsolidationParams, consolidate_parties
    from amalgam.protocol.schemas import LayersPolicy, WeightsPolicy

    torch.manual_seed(0)
    general = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=5, width=8)
    expert = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3, width=8)
    shares = Policy(
        predict=PredictPolicy(output="logits"), weights=WeightsPolicy(),
        activations=LayersPolicy(layers=["penultimate"]), sample_budget=None,
    )  # fmt: skip
    teachers = [
        LocalTeacher(local_party("general", general, list("01234"), (1, 8, 8), shares, tmp_path)),
        LocalTeacher(local_party("expert", expert, list("567"), (1, 8, 8), shares, tmp_path)),
    ]
    task = {"name": "d89", "train": "digits:private-2", "test": "digits:test",
            "classes": ["8", "9"]}  # fmt: skip
    params = ConsolidationParams(generalist="general", epochs=1, draws=1, tasks=[task])
    proxy, test = load_source("digits:public"), load_source("digits:test")
    context = RunContext(progress=False, hardware=Float64Device())
    result = consolidate_parties(teachers, params, proxy, test, context)
    student = result.students["consolidated"]
    assert {p.dtype for p in student.parameters()} == {torch.float64}
    assert {"consolidated:d89", "kd:d89", "consolidated:upstream-expert"} <= set(result.rows)


@pytest.mark.parametrize("arch", ["vgg_cnn", "small_cnn"])
def test_amalgamation_trains_layers_autoencoders_and_student_where_its_hardware_puts_them(
    tmp_path, arch
):
    from amalgam.fusion.amalgamation import AmalgamationConfig, FeatureCache, amalgamate
    from amalgam.protocol.schemas import LayersPolicy

    shares = Policy(predict=PredictPolicy(output="logits"),
                    activations=LayersPolicy(layers=["*"]), sample_budget=None)  # fmt: skip
    teachers = []
    for shard, classes in enumerate([list("01234"), list("56789")]):
        torch.manual_seed(shard)
        model = create_model("vgg_cnn", num_classes=5, in_shape=(1, 8, 8), stages=((8,), (16,)),
                             fc=(32,))  # fmt: skip
        teachers.append(LocalTeacher(local_party(f"t{shard}", model, classes, (1, 8, 8), shares,
                                                 tmp_path)))  # fmt: skip
    config = AmalgamationConfig(feature_samples=64, layer_epochs=1, autoencoder_epochs=1)
    context = RunContext(progress=False, hardware=Float64Device())
    x = load_source("digits:public").x[:128]
    result = amalgamate(teachers, x, config, StudentConfig(arch=arch, epochs=1, batch_size=32),
                        FeatureCache(tmp_path / "cache"), context)  # fmt: skip
    logits = predict_logits(result.joint, x[:8])
    assert logits.shape == (8, 10)
    if arch == "vgg_cnn":  # folded into a plain network on the host
        assert logits.dtype == torch.float32 and "stages.0.0.bn" in result.losses
    else:  # the library path: the student stays where it trained
        assert {p.dtype for p in result.joint.parameters()} == {torch.float64}
        assert {"body.1.2", "body.4.2"} <= set(result.losses)  # its points at 8x8 and 4x4
    assert "joint" in result.losses


def test_a_detector_trains_and_detects_where_its_hardware_puts_it():
    import numpy as np

    from amalgam.fusion.detection.canvas import make_canvases
    from amalgam.fusion.detection.models import create_detector
    from amalgam.fusion.detection.train import detect, fit_detector

    canvases = make_canvases(load_source("digits:train").subset(np.arange(100)), 32, size=64,
                             seed=0)  # fmt: skip
    torch.manual_seed(0)
    model = create_detector("fcos", 10, size=64)
    history = fit_detector(model, canvases, epochs=1, batch_size=16, progress=False,
                           hardware=Float64Device())  # fmt: skip
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    found = detect(model, canvases.images[:4])
    assert len(found) == 4 and all(d.boxes.dtype == torch.float32 for d in found)
    assert len(history) == 1 and np.isfinite(history[0])


def test_a_partys_own_generator_trains_where_its_hardware_puts_it(teachers):
    from amalgam.party.synthesis import SynthesisSessions

    handler = teachers[0].handler
    sessions = SynthesisSessions(handler.own_teacher(), Float64Device())
    params = DataFreeConfig(variant="dfmf", warmup=1, iterations=2, batch_size=8,
                            generator_width=8).model_dump()  # fmt: skip
    made = sessions.advance("c", "s", params, steps=3, samples=5)
    trainer = sessions._sessions[("c", "s")][0]
    assert {p.dtype for p in trainer.generator.parameters()} == {torch.float64}
    assert {p.dtype for p in trainer.assistant.parameters()} == {torch.float64}
    assert made.samples.shape == (5, 1, 8, 8) and made.samples.dtype == torch.float32
    assert made.steps_done == 3

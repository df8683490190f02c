"""One contract for every Teacher implementation: in-process and over gRPC behave the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parties import CLASSES, INPUT_SHAPE, tiny_handler

from amalgam.fusion.activations import centered_gram
from amalgam.fusion.teacher import Teacher
from amalgam.party.audit import read_records, verify_chain
from amalgam.party.local import LocalTeacher
from amalgam.protocol.errors import BudgetExceeded, InvalidRequest, PolicyDenied
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy, WeightsPolicy
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import serving


class TeacherContract:
    """Subclasses provide ``make(handler) -> Teacher`` (a context manager)."""

    __test__ = False

    def make(self, handler):
        raise NotImplementedError

    def test_is_a_teacher_describing_the_party(self, tmp_path):
        handler = tiny_handler(tmp_path)
        with self.make(handler) as teacher:
            assert isinstance(teacher, Teacher)
            assert teacher.info.name == "acme"
            assert teacher.info.class_names == tuple(CLASSES)
            assert teacher.info.input_shape == INPUT_SHAPE
            assert teacher.info.output_form == "probs"
            assert teacher.info.capabilities == ("predict",)
            assert teacher.info.max_batch == 16

    def test_predict_matches_the_model_across_chunks(self, tmp_path):
        handler = tiny_handler(tmp_path)
        x = torch.rand(37, *INPUT_SHAPE)  # more than max_batch 16: three calls
        with self.make(handler) as teacher:
            out = teacher.predict(x)
        expected = F.softmax(handler.model(x), dim=1)
        torch.testing.assert_close(out, expected)
        granted = [r for r in read_records(handler.audit.path) if r["method"] == "Predict"]
        assert [r["samples"] for r in granted] == [16, 16, 5]

    def test_label_form_releases_int64_labels(self, tmp_path):
        handler = tiny_handler(tmp_path, Policy(predict=PredictPolicy(output="label")))
        x = torch.rand(5, *INPUT_SHAPE)
        with self.make(handler) as teacher:
            out = teacher.predict(x)
        assert out.dtype == torch.int64
        assert torch.equal(out, handler.model(x).argmax(dim=1))

    def test_denied_by_default(self, tmp_path):
        handler = tiny_handler(tmp_path, Policy())
        with self.make(handler) as teacher, pytest.raises(PolicyDenied, match="acme"):
            teacher.predict(torch.rand(2, *INPUT_SHAPE))
        assert read_records(handler.audit.path)[-1]["decision"] == "denied"

    def test_budget_is_enforced_per_caller(self, tmp_path):
        policy = Policy(predict=PredictPolicy(), sample_budget=10)
        handler = tiny_handler(tmp_path, policy)
        with self.make(handler) as teacher:
            teacher.predict(torch.rand(10, *INPUT_SHAPE))
            with pytest.raises(BudgetExceeded, match="budget of 10"):
                teacher.predict(torch.rand(1, *INPUT_SHAPE))
        decisions = [r["decision"] for r in read_records(handler.audit.path)]
        assert decisions[-2:] == ["granted", "budget_exceeded"]

    def test_wrong_input_shape_is_invalid(self, tmp_path):
        handler = tiny_handler(tmp_path)
        with self.make(handler) as teacher, pytest.raises(InvalidRequest) as raised:
            teacher.predict(torch.rand(2, 1, 7, 7))
        assert raised.value.field == "inputs.shape"

    def test_every_call_is_audited_in_an_intact_chain(self, tmp_path):
        handler = tiny_handler(tmp_path)
        with self.make(handler) as teacher:
            teacher.predict(torch.rand(3, *INPUT_SHAPE))
        records = read_records(handler.audit.path)
        assert [r["method"] for r in records] == ["Describe", "Predict"]
        assert records[-1]["bytes_out"] == 3 * len(CLASSES) * 4
        assert verify_chain(records)

    # ---- Activations, Gram, ExportWeights (weight fusion, paper 002) ----------------------

    def _layers_policy(self, **overrides):
        grants = dict(
            predict=PredictPolicy(),
            activations=LayersPolicy(layers=["body.1", "body.3"]),
            gram=LayersPolicy(layers=["*"]),
            weights=WeightsPolicy(chunk_bytes=1024),
            max_batch=16,
        )
        return Policy(**(grants | overrides))

    def test_activations_match_the_model_across_chunks(self, tmp_path):
        handler = tiny_handler(tmp_path, self._layers_policy())
        x = torch.rand(20, *INPUT_SHAPE)  # two calls of at most 16
        with self.make(handler) as teacher:
            assert teacher.info.capabilities == ("predict", "activations", "gram", "weights")
            assert "body.1" in teacher.info.layers and "head" in teacher.info.layers
            out = teacher.activations(x, ["body.1"])
        expected = handler.model.body[1](handler.model.body[0](x))  # pre-activation
        torch.testing.assert_close(out["body.1"], expected)
        granted = [r for r in read_records(handler.audit.path) if r["method"] == "Activations"]
        assert [r["samples"] for r in granted] == [16, 4]

    def test_gram_equals_the_centered_gram_of_the_activations(self, tmp_path):
        handler = tiny_handler(tmp_path, self._layers_policy())
        x = torch.rand(12, *INPUT_SHAPE)
        with self.make(handler) as teacher:
            grams = teacher.gram(x, ["body.3", "head"])
            acts = teacher.activations(x, ["body.3"])
        assert grams["body.3"].shape == (12, 12)
        torch.testing.assert_close(grams["body.3"], centered_gram(acts["body.3"]))
        torch.testing.assert_close(grams["head"].sum(dim=0), torch.zeros(12), atol=1e-5, rtol=0)

    def test_layers_outside_the_policy_are_denied(self, tmp_path):
        handler = tiny_handler(tmp_path, self._layers_policy())
        with self.make(handler) as teacher:
            with pytest.raises(PolicyDenied, match="'head' is not released"):
                teacher.activations(torch.rand(2, *INPUT_SHAPE), ["head"])
        with self.make(tiny_handler(tmp_path, Policy(predict=PredictPolicy()))) as teacher:
            with pytest.raises(PolicyDenied, match="Gram is not granted"):
                teacher.gram(torch.rand(2, *INPUT_SHAPE), ["body.1"])
        assert read_records(handler.audit.path)[-1]["decision"] == "denied"

    def test_weights_export_rebuilds_the_same_function(self, tmp_path):
        handler = tiny_handler(tmp_path, self._layers_policy())
        with self.make(handler) as teacher:
            weights = teacher.weights()
        assert weights.architecture["name"] == "mlp"
        model = weights.build()
        x = torch.rand(5, *INPUT_SHAPE)
        torch.testing.assert_close(model(x), handler.model(x), rtol=0, atol=0)
        record = read_records(handler.audit.path)[-1]
        assert record["method"] == "ExportWeights" and record["decision"] == "granted"
        assert record["bytes_out"] > 1024  # streamed in several 1 KiB chunks

    def test_weights_are_denied_by_default(self, tmp_path):
        handler = tiny_handler(tmp_path, self._layers_policy(weights=None))
        with self.make(handler) as teacher, pytest.raises(PolicyDenied, match="ExportWeights"):
            teacher.weights()


class _Local:
    def __init__(self, handler):
        self.teacher = LocalTeacher(handler)

    def __enter__(self):
        return self.teacher

    def __exit__(self, *exc):
        return False


class _Remote:
    def __init__(self, handler):
        self.serving = serving(handler)

    def __enter__(self):
        address = self.serving.__enter__()
        self.teacher = RemoteTeacher("acme", address, deadline_s=10)
        self.teacher.info  # noqa: B018 (Describe once, as the coordinator does on connect)
        return self.teacher

    def __exit__(self, *exc):
        self.teacher.close()
        return self.serving.__exit__(*exc)


class TestLocalTeacher(TeacherContract):
    __test__ = True

    def make(self, handler):
        return _Local(handler)


class TestRemoteTeacher(TeacherContract):
    __test__ = True

    def make(self, handler):
        return _Remote(handler)

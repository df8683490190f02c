"""party/slicing.py: Predict runs the model in slices whose widest activation fits a byte
budget, with the same answer as one pass; models whose answer depends on the batch, on an
accelerator, or that refuse the probe are run whole."""

from __future__ import annotations

import torch
from torch import nn

from amalgam.fusion.models import create_model
from amalgam.party.audit import AuditLog
from amalgam.party.handler import PartyHandler
from amalgam.party.local import LocalTeacher
from amalgam.party.slicing import slice_size, sliced_forward
from amalgam.protocol.schemas import Policy, PredictPolicy


def conv_net(batch_stats: bool = True) -> nn.Module:
    """(B, 1, 16, 16) -> (B, 3); its widest activation is the convolution's (8, 16, 16)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8, track_running_stats=batch_stats),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


PER_SAMPLE = 8 * 16 * 16 * 4  # bytes of the widest activation of one sample of conv_net


def test_slice_follows_the_widest_activation():
    x = torch.rand(4, 1, 16, 16)
    assert slice_size(conv_net(), x, budget_bytes=5 * PER_SAMPLE) == 5
    assert slice_size(conv_net(), x, budget_bytes=PER_SAMPLE // 2) == 1  # never below one
    # an exported graph has no modules to hook: the operations themselves are measured
    batch = {"input": {0: torch.export.Dim("batch")}}
    exported = torch.export.export(conv_net(), (x,), dynamic_shapes=batch).module()
    assert slice_size(exported, x, budget_bytes=5 * PER_SAMPLE) == 5


def test_models_left_whole():
    x = torch.rand(4, 1, 16, 16)
    assert slice_size(conv_net(batch_stats=False), x) == 0  # normalizes by its batch
    assert slice_size(conv_net(), x.to("meta")) == 0  # not on the CPU
    refuses = nn.Linear(3, 3)  # cannot take (B, 1, 16, 16) inputs
    assert slice_size(refuses, x) == 0


def test_large_batches_run_in_even_slices_small_ones_whole():
    model, x = conv_net(), torch.rand(11, 1, 16, 16)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    with torch.no_grad():
        whole = model(x)
        calls.clear()
        parts = sliced_forward(model, x, 2)  # 11 > WHOLE_SLICES * 2: six slices
        assert calls == [2, 2, 2, 2, 2, 1]
        calls.clear()
        assert torch.equal(sliced_forward(model, x, 3), whole) and calls == [11]  # 11 <= 12
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)


def test_predict_answers_in_slices(tmp_path):
    model = create_model("small_cnn", in_shape=(1, 28, 28), num_classes=10, width=16).eval()
    policy = Policy(predict=PredictPolicy(output="probs"), max_batch=512)
    handler = PartyHandler("p", model, [str(k) for k in range(10)], (1, 28, 28), policy,
                           AuditLog(tmp_path / "audit.jsonl"))  # fmt: skip
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    x = torch.rand(512, 1, 28, 28)  # (16, 28, 28) floats each: 83 per 4 MiB, 512 > 4 x 83
    probs = LocalTeacher(handler).predict(x)
    assert len(calls) == 7 and max(calls) <= 83 and sum(calls) == 512
    with torch.no_grad():
        torch.testing.assert_close(probs, model(x).softmax(1), rtol=0, atol=1e-6)

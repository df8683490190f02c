"""fusion/train.py: the shared training loop's epoch callback."""

from __future__ import annotations

import io

import pytest
import torch

from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 16}


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 8, 8, generator=generator), torch.randint(0, 3, (64,))


def _model():
    torch.manual_seed(0)
    return create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3, width=4)


def test_on_epoch_sees_every_epoch_in_eval_mode_and_training_resumes():
    x, y = _data()
    model = _model()
    seen, modes, running_means = [], [], []
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def record(epoch: int) -> None:
        seen.append(epoch)
        modes.append(model.training)
        running_means.append(bn.running_mean.clone())

    fit(model, x, y, epochs=3, seed=1, progress=False, on_epoch=record, **SGD)
    assert seen == [1, 2, 3]
    assert modes == [False, False, False]
    # the BatchNorm statistics moved after each callback: training went on in train mode
    assert not torch.equal(running_means[0], running_means[1])
    assert not torch.equal(running_means[1], running_means[2])


def test_curve_point_equals_a_shorter_run_at_constant_rate():
    """With SGD at a constant rate, the model after epoch k of a longer run is the model of a
    k-epoch run: one fine-tuning run gives the whole budget curve."""
    x, y = _data()
    long, short = _model(), _model()
    at_two = {}

    def snapshot(epoch: int) -> None:
        if epoch == 2:
            at_two.update({k: v.clone() for k, v in long.state_dict().items()})

    fit(long, x, y, epochs=4, seed=3, progress=False, on_epoch=snapshot, **SGD)
    fit(short, x, y, epochs=2, seed=3, progress=False, **SGD)
    for name, tensor in short.state_dict().items():
        torch.testing.assert_close(at_two[name], tensor, rtol=0, atol=0)


class MemoryCheckpoint:
    """Keeps the saved state; ``stop_after`` epochs ends the run as a crash would."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.state, self.saves, self.stop_after = None, 0, stop_after

    def load(self):
        return self.state

    def save(self, state):
        buffer = io.BytesIO()  # through bytes, as a file on disk would be
        torch.save(state, buffer)
        buffer.seek(0)
        self.state = torch.load(buffer, weights_only=True)
        self.saves += 1
        if self.saves == self.stop_after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_an_interrupted_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(optimizer):
    x, y = _data()
    options = dict(SGD, optimizer=optimizer, lr=0.01)
    whole = _model()
    losses = fit(whole, x, y, epochs=5, seed=2, progress=False, **options)

    checkpoint = MemoryCheckpoint(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), x, y, epochs=5, seed=2, progress=False, checkpoint=checkpoint, **options)
    checkpoint.stop_after = None
    resumed = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3, width=4)  # other init
    resumed_losses = fit(resumed, x, y, epochs=5, seed=2, progress=False, checkpoint=checkpoint,
                         **options)  # fmt: skip
    assert resumed_losses == losses
    for name, tensor in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    assert checkpoint.saves == 5

"""Forward passes in slices that fit the CPU's caches.

On a CPU, a network's inference is bound by memory traffic once one layer's activations
outgrow the caches: every layer then streams its whole batch out to memory and back. A batch
whose widest activation outgrows :data:`WHOLE_SLICES` slices of :data:`SLICE_BYTES` (a large
last-level cache) is run in slices of that size; a smaller one is run whole, as the Python
calls of each slice cost more there than they save. Measured on this project's 2-core machine
(32 MiB L3) in an agent's Predict at batch 1,024 (``python -m benchmarks.protocol``), sliced
against whole: 1.19 times the images/s for the small BN-CNN at 28x28, 1.71 for ``vgg_cnn`` and
2.57 for ``resnet20_cifar`` at 32x32; networks whose activations are small anyway (an MLP, the
demo CNN at 8x8) are as fast either way.
Slicing changes nothing in the answer of a network in evaluation mode, where every sample is
computed on its own; one that normalizes with the statistics of its batch (a BatchNorm without
running statistics) is never sliced, nor is a model on an accelerator, whose memory is not a
cache.

Slices multiply the Python calls of a forward pass, each of which needs the interpreter's lock:
where many agents share one process and its lock (the simulated marketplace: a thousand agents
and their gRPC threads), fewer, larger passes win -- 32 such agents answered 5,460 images/s in
whole batches of 256 against 4,370 in slices -- so ``slice_mb`` (:class:`PartyConfig`) can turn
it off.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SLICE_BYTES = 4 * 2**20  # the widest activation of one slice: a few MiB, what the caches hold
WHOLE_SLICES = 4  # a batch of up to this many slices runs whole
PROBE_BATCH = 2


class _WidestActivation(TorchDispatchMode):
    """Records the largest batch of activations (a tensor whose first dimension is the
    batch's) that any operation produces, in bytes; weights and their views, of other shapes,
    are left out. It sees the operations themselves, so it measures any network: modules,
    functional code or a ``torch.export`` graph alike."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.widest = batch, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor) and leaf.ndim and leaf.shape[0] == self.batch:
                self.widest = max(self.widest, leaf.numel() * leaf.element_size())
        return out


def batch_dependent(model: nn.Module) -> bool:
    """Whether ``model``'s answer to one sample depends on the others of its batch in
    evaluation mode: a BatchNorm that keeps no running statistics normalizes by the batch's."""
    return any(
        isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is None
        for module in model.modules()
    )


def slice_size(model: nn.Module, x: Tensor, budget_bytes: int = SLICE_BYTES) -> int:
    """Samples per forward pass of ``model`` on inputs like ``x`` ((B, ...), on the model's
    device, in its dtype), so that its widest activation stays within ``budget_bytes``; 0 where
    the model is better left whole (no budget, an accelerator, a batch-dependent model, or one
    whose dry forward on the first :data:`PROBE_BATCH` samples fails)."""
    if not budget_bytes or x.device.type != "cpu" or batch_dependent(model):
        return 0
    probe = x[:PROBE_BATCH]
    widest = _WidestActivation(len(probe))
    try:
        with torch.no_grad(), widest:
            model(probe)
    except Exception:  # the owner's model refuses the probe: it is then run whole
        return 0
    per_sample = max(1, widest.widest // len(probe))
    return max(1, budget_bytes // per_sample)


def sliced_forward(model: nn.Module, x: Tensor, size: int) -> Tensor:
    """``model(x)`` for (B, ...) inputs, computed in even slices of at most ``size`` samples
    where B exceeds :data:`WHOLE_SLICES` of them (else, or where ``size`` is 0, at once); the
    outputs, (B, ...), concatenated."""
    if not size or len(x) <= WHOLE_SLICES * size:
        return model(x)
    return torch.cat([model(part) for part in x.tensor_split(math.ceil(len(x) / size))])

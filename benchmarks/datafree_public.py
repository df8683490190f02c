"""The public DataFree code's DFQ (github.com/zju-vipa/DataFree) on the data-free benchmark's
teachers, for the side-by-side rows ``public_dfq`` and ``public_dfq_no_adv``.

Nothing of that code is copied here: :func:`load_public_code` imports its generator, its
``GenerativeSynthesizer`` and its ``KLDiv`` from a local checkout given on the command line
(``python -m benchmarks.datafree --public-code PATH``), without running the package's
``__init__`` files, which pull in data set and plotting libraries that the synthesizer does not
need. The loop follows its ``datafree_kd.py`` and ``scripts/dfq/`` settings, adapted only to
the benchmark's set-up:

* one generator (``LargeGenerator``, latent 256, width 64) for the teachers' mean logits, the
  BatchNorm hooks on every teacher's layers;
* generator loss weights adversary 1, BN 1, one-hot 1, balance 20 (``adv 0`` for DFQ w/o ADV,
  whose generator keeps training on the fidelity terms), Adam lr 1e-3, betas (0.5, 0.999);
* the student: SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine schedule, KL at T = 1 on
  fresh generator samples, no augmentation;
* the benchmark's budget: ``warmup`` generator steps without the adversary, then
  ``iterations`` rounds of one generator step and ``student_steps`` student steps.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
from torch import Tensor, nn

from amalgam.fusion.train import build_student

PUBLIC_METHODS = {"public_dfq": 1.0, "public_dfq_no_adv": 0.0}  # method -> adversary weight


def _package(name: str, folder: Path) -> types.ModuleType:
    """An empty package ``name`` over ``folder``: its submodules import, its __init__ does not
    run."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    return package


def load_public_code(checkout: Path) -> types.SimpleNamespace:
    """The public code's ``LargeGenerator``, ``GenerativeSynthesizer`` and ``KLDiv``."""
    root = checkout / "datafree"
    if not (root / "synthesis" / "generative.py").is_file():
        raise ValueError(f"--public-code: {checkout} is not a checkout of zju-vipa/DataFree")
    for name in ("datafree", "datafree.utils", "datafree.synthesis", "datafree.models"):
        _package(name, root.joinpath(*name.split(".")[1:]))
    helpers = importlib.import_module("datafree.utils._utils")
    for name in ("ImagePool", "DataIter", "clip_images"):  # what the synthesizers import
        setattr(sys.modules["datafree.utils"], name, getattr(helpers, name))
    return types.SimpleNamespace(
        LargeGenerator=importlib.import_module("datafree.models.generator").LargeGenerator,
        GenerativeSynthesizer=importlib.import_module(
            "datafree.synthesis.generative"
        ).GenerativeSynthesizer,
        KLDiv=importlib.import_module("datafree.criterions").KLDiv,
    )


class MeanTeacher(nn.Module):
    """The teachers as the one teacher the public synthesizer expects: mean logits, and the
    mean of their penultimate features for its ``return_features`` calls."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor, return_features: bool = False):
        logits = torch.stack([m(x) for m in self.models]).mean(dim=0)  # (B, K)
        if not return_features:
            return logits
        return logits, logits  # the activation loss is off (weight 0); any tensor serves


def run_public_dfq(
    code: types.SimpleNamespace,
    models: list[nn.Module],
    in_shape: tuple[int, int, int],
    adversary: float,
    b: dict,
    seed: int,
) -> nn.Module:
    """A student (network ``b["student"]``) distilled by the public DFQ loop from ``models``
    (inputs ``in_shape``, C, H, W); returns it in eval mode."""
    torch.manual_seed(seed)
    teacher = MeanTeacher([m.eval() for m in models]).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    num_classes = teacher(torch.zeros(1, *in_shape)).shape[1]
    student = build_student(b["student"], in_shape, num_classes, log=lambda message: None)
    generator = code.LargeGenerator(nz=256, ngf=64, img_size=in_shape[-1], nc=in_shape[0])
    synthesizer = code.GenerativeSynthesizer(
        teacher=teacher, student=student, generator=generator, nz=256, img_size=in_shape,
        iterations=1, lr_g=1e-3, synthesis_batch_size=128, sample_batch_size=128,
        adv=0.0, bn=1.0, oh=1.0, act=0.0, balance=20.0, criterion=code.KLDiv(),
        normalizer=lambda x, reverse=False: x, device="cpu",
    )  # fmt: skip
    for _ in range(b["warmup"]):
        synthesizer.synthesize()
    synthesizer.adv = adversary
    criterion = code.KLDiv()  # T = 1, as its DFQ run
    optimizer = torch.optim.SGD(student.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    steps = b["iterations"] * b["student_steps"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(b["iterations"]):
        synthesizer.synthesize()
        student.train()
        for _ in range(b["student_steps"]):
            images = synthesizer.sample()
            with torch.no_grad():
                target = teacher(images)
            loss = criterion(student(images.detach()), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return student.eval()

"""Party-side synthesis mode of data-free fusion.

Each party trains its own generator (and assistant) against its own teacher through
``Teacher.synthesize`` and returns generated images; the coordinator asks every teacher for
its logits on the union of the images (Eq. 1) and trains the student. One round is one
Synthesize call and one Predict call per party: tens of round trips instead of thousands.
The budget matches coordinator mode: the same generator steps, student steps and student
samples.
"""

from __future__ import annotations

import math
import uuid

import torch
from pydantic import model_validator

from amalgam.fusion.datafree.generator import augment
from amalgam.fusion.datafree.trainer import (
    VARIANTS,
    DataFreeConfig,
    DataFreeFusion,
    DataFreeResult,
    warmup_steps,
)
from amalgam.fusion.progress import progress_bar


class SynthesisParams(DataFreeConfig):
    """What a party needs to train its own generator (and assistant): the run's
    hyper-parameters, the assistant's architecture and the seed (the ``SynthesisParams`` of a
    ``Synthesize`` request). Only variants that do not play against the student run there."""

    student_arch: str = "small_cnn"  # the assistant's architecture: the student's
    seed: int = 0

    @model_validator(mode="after")
    def _runs_without_the_student(self) -> SynthesisParams:
        if VARIANTS[self.variant].adversary == "student":
            raise ValueError(
                f"variant {self.variant!r} plays against the student, which stays at the "
                "coordinator; run it in coordinator mode"
            )
        return self


class PartySideFusion(DataFreeFusion):
    """:class:`DataFreeFusion` whose generators live at the parties."""

    def __init__(self, teachers, config, rounds: int = 20, **kwargs) -> None:
        super().__init__(teachers, config, own_generators=False, **kwargs)
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.rounds = rounds
        self.session = f"{config.variant}-{self.context.seed}-{uuid.uuid4().hex[:8]}"

    def run(self, checkpoints: int = 4) -> DataFreeResult:
        c, teachers = self.config, self.teachers
        params = SynthesisParams(  # a party's assistant learns from logits alone (no VID)
            **c.model_dump(include=set(DataFreeConfig.model_fields) - {"beta"}),
            student_arch=self.student_arch,
            seed=self.context.seed,
        ).model_dump()
        per_round = math.ceil(c.iterations / self.rounds)
        per_generator = max(2, c.batch_size // len(teachers))
        pool = per_round * c.student_steps * per_generator  # images per party per round
        frozen = self.variant.freeze_after_warmup
        generator_queries = [0] * len(teachers)
        samples, every = [], max(1, self.rounds // max(1, checkpoints))
        bar = progress_bar(self.rounds, f"{c.variant} (party-side)", show=self.context.progress)
        # per main-loop step, an assistant's fresh batches, labelled by the party's teacher
        fresh_batches = c.assistant_steps - 1 if self.variant.adversary == "assistant" else 0
        for r in range(self.rounds):
            main = 0 if frozen else per_round
            steps = (warmup_steps(c) if r == 0 else 0) + main
            made = self.context.map_teachers(
                lambda t, n=steps: t.synthesize(params, self.session, n, pool), teachers
            )
            for k, synthesis in enumerate(made):
                generator_queries[k] += (steps + main * fresh_batches) * c.batch_size
                for name, value in synthesis.losses.items():  # "generator/bn", "assistant/kl"
                    model, _, term = name.partition("/")
                    self.history.record(f"{model}{k}/{term}", value)
            if r == 0 or (r + 1) % every == 0:
                samples.append([s.samples[:16] for s in made])
            x = torch.cat([s.samples for s in made])  # the union of every party's images
            x = augment(x, c.augment_shift, self.rng)  # each image is used once per round
            targets = self.student_targets(x)
            maps = None if self.vid is None else self.vid.teacher_maps(teachers, x)
            order = torch.randperm(len(x), generator=self.rng)
            batch = per_generator * len(teachers)
            for i in range(per_round * c.student_steps):
                index = order[(i * batch) % len(x) :][:batch]
                batch_maps = maps and [None if m is None else m[index] for m in maps]
                self.student_step(x[index], targets[index], batch_maps)
            bar.update()
        bar.close()
        return self.result(samples, generator_queries)

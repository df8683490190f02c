"""Party-side synthesis: the party trains its own generator (and, for DFMF, its generator
assistant) against its own teacher, in process, and releases generated images only.

In the paper's Algorithm 1, generator k and assistant k interact only with teacher k; only the
student needs every teacher. Running them here turns thousands of BatchNormFeedback round trips
into a few Synthesize calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from amalgam.fusion.config import validated
from amalgam.fusion.datafree.party_side import SynthesisParams
from amalgam.fusion.datafree.trainer import GeneratorTrainer, History
from amalgam.fusion.device import Hardware, to_host
from amalgam.fusion.teacher import Feedback, GeneratorObjective, Synthesis, TeacherInfo

FeedbackFn = Callable[[Tensor, GeneratorObjective, Tensor | None], Feedback]
LogitsFn = Callable[[Tensor], Tensor]


class OwnTeacher:
    """The party's own model as a :class:`amalgam.fusion.teacher.Teacher`, for its own generator
    and assistant: no budget or audit per step (the Synthesize call that drives it is audited),
    and logits whatever the policy releases to others."""

    def __init__(self, info: TeacherInfo, feedback: FeedbackFn, logits: LogitsFn) -> None:
        self.info = replace(info, output_form="logits")
        self._feedback, self._logits = feedback, logits

    def predict(self, x: Tensor) -> Tensor:
        return self._logits(x)

    def bn_feedback(self, x, objective, adversary_logits=None, grad_logits=None) -> Feedback:
        return self._feedback(x, objective, adversary_logits)


class SynthesisSessions:
    """Generators by (caller, session); each keeps its state between calls."""

    def __init__(self, teacher: OwnTeacher, hardware: Hardware = Hardware()) -> None:
        self.teacher = teacher
        self.hardware = hardware  # where the generators and assistants train: the model's
        self._sessions: dict[tuple[str, str], tuple[GeneratorTrainer, dict, list[int]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def config(params: dict) -> SynthesisParams:
        """Validate the caller's hyper-parameters (``ValueError`` naming the first bad one); a
        variant that plays against the student cannot run here."""
        return validated(SynthesisParams, params)

    def _session(self, caller: str, session: str, params: dict):
        with self._lock:
            key = (caller, session)
            if key not in self._sessions:
                config = self.config(params)
                torch.manual_seed(config.seed)
                rng = torch.Generator().manual_seed(config.seed)
                trainer = GeneratorTrainer(self.teacher, config, 0, History(), rng,
                                           config.student_arch, self.hardware)  # fmt: skip
                self._sessions[key] = (trainer, params, [0])
            trainer, first_params, done = self._sessions[key]
            if params != first_params:
                raise ValueError(f"session {session!r} was started with other parameters")
            return trainer, done

    def advance(
        self, caller: str, session: str, params: dict, steps: int, samples: int
    ) -> Synthesis:
        """Run ``steps`` generator steps (warm-up first, then Eq. 6 with the assistant), then
        draw ``samples`` images."""
        trainer, done = self._session(caller, session, params)
        history = trainer.history
        marks = {name: len(curve) for name, curve in history.curves.items()}
        for _ in range(steps):
            warming = done[0] < trainer.config.warmup
            x, logits = trainer.step(None if warming else trainer.assistant)
            if not warming and trainer.assistant is not None:
                trainer.train_assistant(x, logits)
            done[0] += 1
        fresh = {
            name: curve[marks.get(name, 0) :]
            for name, curve in history.curves.items()
            if len(curve) > marks.get(name, 0)
        }
        # "generator0/bn" -> "generator/bn": the caller numbers its parties itself
        losses = {name.replace("0/", "/", 1): sum(v) / len(v) for name, v in fresh.items()}
        return Synthesis(to_host(trainer.sample(samples)), losses, done[0])

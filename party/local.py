"""In-process teacher: the party's own handler, called without a network in between."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from amalgam.fusion.teacher import Detections, TeacherInfo, Weights, concat_chunks, in_chunks
from amalgam.party.handler import PartyHandler

if TYPE_CHECKING:  # the handler builds what these calls return
    from amalgam.fusion.teacher import Feedback, GeneratorObjective, Synthesis


class LocalTeacher:
    """A :class:`amalgam.fusion.teacher.Teacher` that enforces the policy through
    :class:`PartyHandler`."""

    def __init__(self, handler: PartyHandler, caller: str = "local") -> None:
        self.handler = handler
        self.caller = caller
        self.info = TeacherInfo.from_dict(handler.describe(caller).model_dump())

    def predict(self, x: Tensor) -> Tensor:
        def call(chunk: Tensor) -> Tensor:
            return self.handler.predict(chunk, caller=self.caller)

        return in_chunks(call, x, self.info.max_batch)

    def detect(self, x: Tensor) -> list[Detections]:
        """A detection party's boxes on (B, C, H, W) inputs, one entry per image."""
        found: list[Detections] = []
        chunk = self.info.max_batch or len(x)
        for start in range(0, len(x), chunk):
            rows = self.handler.detect(x[start : start + chunk], caller=self.caller)
            found += Detections.split(*rows)
        return found

    def bn_feedback(
        self,
        x: Tensor,
        objective: GeneratorObjective,
        adversary_logits: Tensor | None = None,
        grad_logits: Tensor | None = None,
    ) -> Feedback:
        return self.handler.bn_feedback(x, self.caller, objective, adversary_logits, grad_logits)

    def synthesize(self, params: dict, session: str, steps: int, samples: int) -> Synthesis:
        return self.handler.synthesize(self.caller, session, params, steps, samples)

    def activations(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        def call(chunk: Tensor) -> dict[str, Tensor]:
            return self.handler.layers(chunk, layers, self.caller)

        return concat_chunks(call, x, self.info.max_batch)

    def gram(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        return self.handler.layers(x, layers, self.caller, gram=True)

    def weights(self) -> Weights:
        return Weights.from_safetensors(*self.handler.export_weights(self.caller))

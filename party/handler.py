"""The one place where the owner's policy is enforced.

:class:`PartyHandler` backs both the in-process :class:`amalgam.party.local.LocalTeacher` and
the gRPC servicer; every call, granted or denied, is appended to the audit log.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import NoReturn

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from amalgam.fusion.activations import layer_grams, layer_names, layer_outputs
from amalgam.fusion.datafree.bn_loss import bn_statistics_loss
from amalgam.fusion.datafree.losses import teacher_side_loss
from amalgam.fusion.device import Hardware, resolve_device
from amalgam.fusion.teacher import Feedback, GeneratorObjective, Synthesis, TeacherInfo
from amalgam.fusion.zoo import check_forward
from amalgam.party.audit import AuditLog, load_key
from amalgam.party.config import PartyConfig
from amalgam.party.layers import released_layers, unit_outputs
from amalgam.party.model import batchnorm_count, load_model, refuse_unhookable_grants
from amalgam.party.model_thread import on_model_thread
from amalgam.party.ratelimit import TokenBuckets
from amalgam.party.release import release, release_detections
from amalgam.party.slicing import PROBE_BATCH, SLICE_BYTES, slice_size, sliced_forward
from amalgam.party.synthesis import OwnTeacher, SynthesisSessions
from amalgam.protocol.errors import BudgetExceeded, InvalidRequest, ModelFailure, PolicyDenied
from amalgam.protocol.schemas import (
    Normalization,
    PartyInfo,
    Policy,
)

__all__ = ["BudgetExceeded", "InvalidRequest", "PartyHandler", "PolicyDenied", "release"]

CAPABILITIES = {  # the policy's capability behind each RPC (Describe: every admitted caller)
    "Describe": None,
    "Predict": "predict",
    "BatchNormFeedback": "bn_feedback",
    "Synthesize": "synthesize",
    "Activations": "activations",
    "Gram": "gram",
    "ExportWeights": "weights",
}


class PartyHandler:
    """Answers Describe and Predict for one private model under one policy."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        class_names: list[str],
        input_shape: tuple[int, int, int],
        policy: Policy,
        audit: AuditLog,
        normalization: Normalization | None = None,
        device: torch.device | None = None,
        slice_bytes: int = SLICE_BYTES,
    ) -> None:
        self.name = name
        self.device = device or torch.device("cpu")
        self.model = model.eval().to(self.device)
        self.task = getattr(model, "task", "classification")
        self.class_names = list(class_names)
        self.input_shape = tuple(input_shape)
        self.policy = policy
        self.audit = audit
        self.normalization = normalization or Normalization()
        channels = self.input_shape[0]
        mean, std = self.normalization.mean, self.normalization.std
        if len(mean) not in (1, channels):
            raise ValueError(f"normalization has {len(mean)} values for {channels} channels")
        parameter = next(self.model.parameters(), None)
        self._dtype = parameter.dtype if parameter is not None else torch.float32
        as_model = dict(device=self.device, dtype=self._dtype)
        self._mean = torch.tensor(mean, **as_model).view(1, -1, 1, 1)  # (1, C or 1, 1, 1)
        self._std = torch.tensor(std, **as_model).view(1, -1, 1, 1)
        self._batchnorm_layers = batchnorm_count(self.model)
        self._slice = 0  # samples per forward pass of a Predict (0: the whole request)
        if self.task == "classification":
            self._check_forward()
            probe = torch.zeros(PROBE_BATCH, *self.input_shape, **as_model)
            self._slice = slice_size(self.model, probe, slice_bytes)
        refuse_unhookable_grants(self.model, self.policy, self._batchnorm_layers)
        self._layers = {
            "Activations": released_layers(self.model, policy.activations, "activations"),
            "Gram": released_layers(self.model, policy.gram, "gram"),
        }
        released = self._layers["Activations"] if self.task == "classification" else []
        self._feature_layers = unit_outputs(self.model, self.input_shape, released)
        self._used: dict[str, int] = defaultdict(int, audit.spent)  # survives restarts
        rate = policy.rate_limit
        self._rates = TokenBuckets(rate.samples_per_s, rate.burst) if rate else None
        self._synthesis = SynthesisSessions(self.own_teacher(), Hardware(self.device))
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PartyConfig) -> PartyHandler:
        """The handler of a party's configuration; a model that cannot be loaded or that does
        not fit ``input_shape`` and ``class_names`` raises ``ValueError`` naming the field."""
        try:
            device = resolve_device(config.device)
        except ValueError as error:
            raise ValueError(f"device: {error}") from None
        try:
            key = None if config.audit_key is None else load_key(config.audit_key, create=True)
        except ValueError as error:
            raise ValueError(f"audit_key: {error}") from None
        return cls(
            name=config.name,
            model=load_model(config.model, config.input_shape, len(config.class_names)),
            class_names=config.class_names,
            input_shape=config.input_shape,
            policy=config.policy,
            audit=AuditLog(config.audit_log, key),
            normalization=config.normalization,
            device=device,
            slice_bytes=int(config.slice_mb * 2**20),
        )

    def _check_forward(self) -> None:
        """A dry forward pass at start: the model takes ``input_shape`` and answers one logit
        per class name."""
        problem = check_forward(self.model, self.input_shape, len(self.class_names))
        if problem is not None:
            field, message = problem
            raise ValueError(f"{field}: {message}")

    @property
    def exportable(self) -> bool:
        """Whether the model has a registered architecture to export with its weights."""
        return getattr(self.model, "arch", None) is not None

    @property
    def info(self) -> PartyInfo:
        capabilities = self.policy.capabilities
        if not self.exportable:
            capabilities = [c for c in capabilities if c != "weights"]
        released = set(self._layers["Activations"]) | set(self._layers["Gram"])
        return PartyInfo(
            name=self.name,
            class_names=self.class_names,
            input_shape=self.input_shape,
            normalization=self.normalization,
            capabilities=capabilities,
            output_form=self.output_form,
            max_batch=self.policy.max_batch,
            batchnorm_layers=self._batchnorm_layers,
            layers=[name for name in layer_names(self.model) if name in released],
            task=self.task,
            feature_layers=self._feature_layers,
        )

    @property
    def output_form(self) -> str:
        """How Predict answers: the policy's form, ``detections`` for a detector."""
        if self.policy.predict is None:
            return ""
        return "detections" if self.task == "detection" else self.policy.predict.output

    def describe(self, caller: str, request_id: str = "") -> PartyInfo:
        self._authorize("Describe", None, caller, 0, request_id)
        info = self.info
        self.audit.append(
            caller=caller, method="Describe", decision="granted", request_id=request_id
        )
        return info

    def samples_used(self, caller: str) -> int:
        with self._lock:
            return self._used[caller]

    def _deny(
        self,
        error: Exception,
        method: str,
        caller: str,
        samples: int,
        request_id: str,
        decision: str,
    ) -> NoReturn:
        self.audit.append(
            caller=caller,
            method=method,
            decision=decision,
            samples=samples,
            request_id=request_id,
            reason=str(error),
        )
        raise error

    def admit(self, caller: str, method: str, request_id: str = "") -> None:
        """Refuse (audited) a caller that the policy does not list, before any work."""
        if self.policy.callers is not None and caller not in self.policy.callers:
            error = PolicyDenied(
                f"party {self.name}: caller {caller!r} is not admitted by its policy"
            )
            self._deny(error, method, caller, 0, request_id, "denied")

    def authorize(self, method: str, caller: str, request_id: str = "") -> None:
        """Before a request is even decoded: deny (audited) unless the policy grants the
        capability behind ``method`` and lets ``caller`` use it."""
        self._authorize(method, CAPABILITIES[method], caller, 0, request_id)

    def refuse_oversize(self, method: str, caller: str, size: int, limit: int) -> NoReturn:
        """Refuse (audited) a request of ``size`` bytes over the agent's ``limit``."""
        error = BudgetExceeded(
            f"party {self.name}: a request of {size} bytes exceeds max_message_mb "
            f"({limit} bytes); send smaller batches"
        )
        self._deny(error, method, caller, 0, "", "too_large")

    def _authorize(
        self, method: str, capability: str | None, caller: str, samples: int, request_id: str
    ) -> None:
        """Deny (audited) unless the policy grants ``capability`` and lets ``caller`` use it
        (``None``: Describe, open to every caller the policy admits)."""
        if capability is not None and getattr(self.policy, capability) is None:
            error = PolicyDenied(f"party {self.name}: {method} is not granted by its policy")
        elif not self.policy.allows(caller, capability):
            error = PolicyDenied(
                f"party {self.name}: caller {caller!r} may not call {method} under its policy"
            )
        else:
            return
        self._deny(error, method, caller, samples, request_id, "denied")

    def reject_malformed(
        self, method: str, caller: str, request_id: str, field: str, problem: str
    ) -> NoReturn:
        """Audit and refuse a request that could not even be decoded."""
        self._deny(InvalidRequest(field, problem), method, caller, 0, request_id, "invalid")

    def _validate(self, x: Tensor, extra_logits: dict[str, Tensor | None]) -> None:
        """The inputs, and any (B, K) tensors sent along (by field name)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InvalidRequest(
                "inputs.shape",
                f"got {list(x.shape)}, expected [B, {', '.join(map(str, self.input_shape))}]",
            )
        if x.shape[0] > self.policy.max_batch:
            raise InvalidRequest(
                "inputs.shape", f"batch of {x.shape[0]} exceeds max_batch {self.policy.max_batch}"
            )
        if not x.is_floating_point():
            raise InvalidRequest("inputs.dtype", f"{x.dtype} is not a floating dtype")
        low, high = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):  # NaN propagates to both
            raise InvalidRequest("inputs.data", "contains NaN or infinite values")
        if low < 0 or high > 1:
            raise InvalidRequest(
                "inputs.data", f"values in [{low:.3g}, {high:.3g}]; images must lie in [0, 1]"
            )
        for name, logits in extra_logits.items():
            if logits is None:
                continue
            expected = (x.shape[0], len(self.class_names))
            if tuple(logits.shape) != expected:
                raise InvalidRequest(
                    f"{name}.shape", f"got {list(logits.shape)}, expected {list(expected)}"
                )
            if not logits.is_floating_point() or not torch.isfinite(logits).all():
                raise InvalidRequest(f"{name}.data", "must be finite floating values")

    def _reserve(self, caller: str, samples: int) -> None:
        """Charge ``samples`` to the caller's budget and rate limit, or raise
        :class:`BudgetExceeded` with what is left; nothing is charged on a refusal."""
        budget = self.policy.sample_budget
        with self._lock:
            if budget is not None and self._used[caller] + samples > budget:
                left = budget - self._used[caller]
                raise BudgetExceeded(
                    f"party {self.name}: sample budget of {budget} for {caller!r} would be "
                    f"exceeded ({left} left, {samples} asked)"
                )
            if self._rates is not None:
                wait = self._rates.take(caller, samples)
                if wait is not None:
                    rule = self.policy.rate_limit
                    advice = (
                        "more than one burst: send smaller requests"
                        if math.isinf(wait)
                        else f"retry in {wait:.2f}s"
                    )
                    raise BudgetExceeded(
                        f"party {self.name}: rate limit of {rule.samples_per_s:g} samples/s "
                        f"(burst {rule.burst}) for {caller!r}: {samples} asked, {advice}"
                    )
            self._used[caller] += samples

    def _admit(
        self,
        method: str,
        capability: str,
        x: Tensor,
        caller: str,
        request_id: str,
        cost: int = 1,
        extra_logits: dict[str, Tensor | None] | None = None,
    ) -> int:
        """Policy, then validity, then budget (``cost`` per sample); each refusal audited.
        Returns the number of samples."""
        samples = int(x.shape[0]) if x.ndim else 0
        self._authorize(method, capability, caller, samples, request_id)
        try:
            self._validate(x, extra_logits or {})
        except InvalidRequest as error:
            self._deny(error, method, caller, samples, request_id, "invalid")
        try:
            self._reserve(caller, samples * cost)
        except BudgetExceeded as error:
            self._deny(error, method, caller, samples, request_id, "budget_exceeded")
        return samples

    def _granted(
        self,
        method: str,
        caller: str,
        samples: int,
        request_id: str,
        *outputs: Tensor,
        charged: int | None = None,
    ) -> None:
        """Audit a granted call and what it charged to the budget (``samples`` by default):
        the log is what a restarted agent rebuilds each caller's spent budget from."""
        self.audit.append(
            caller=caller,
            method=method,
            decision="granted",
            samples=samples,
            charged=samples if charged is None else charged,
            bytes_out=sum(t.numel() * t.element_size() for t in outputs),
            request_id=request_id,
        )

    def _released_finite(
        self, method: str, caller: str, samples: int, request_id: str, charged: int,
        *outputs: Tensor,
    ) -> None:  # fmt: skip
        """Refuse (audited, the ``charged`` budget given back) to release outputs of the
        model that are not finite: its failure, not the caller's."""
        if all(bool(torch.isfinite(t).all()) for t in outputs):
            return
        with self._lock:
            self._used[caller] -= charged
        error = ModelFailure(
            f"party {self.name}: its model answered NaN or infinite values on these inputs; "
            "nothing was released"
        )
        self._deny(error, method, caller, samples, request_id, "model_failure")

    def _normalize(self, x: Tensor) -> Tensor:
        """(B, C, H, W) inputs in [0, 1] -> the model's input, on its device in its dtype."""
        return (x.to(device=self.device, dtype=self._dtype) - self._mean) / self._std

    def _logits(self, x: Tensor) -> Tensor:
        """(B, C, H, W) inputs in [0, 1] -> (B, K) logits on the CPU, computed in slices that
        fit the CPU's caches (:mod:`amalgam.party.slicing`)."""
        with torch.no_grad():
            return sliced_forward(self.model, self._normalize(x), self._slice).cpu()

    def _detections(self, x: Tensor) -> list[dict[str, Tensor]]:
        """(B, C, H, W) inputs in [0, 1] -> a detector's boxes, scores and labels per image,
        on the CPU."""
        with torch.no_grad():
            found = self.model(list(self._normalize(x)))
        return [{key: value.cpu() for key, value in image.items()} for image in found]

    def predict(self, x: Tensor, caller: str, request_id: str = "") -> Tensor:
        """Predictions on (B, C, H, W) inputs in [0, 1], released as the policy says.

        Raises
        ------
        PolicyDenied, InvalidRequest, BudgetExceeded
            Each after the denial is audited.
        """
        rule = self.policy.predict
        samples = self._admit("Predict", "predict", x, caller, request_id)
        logits = on_model_thread(self._logits, x)  # (B, K)
        self._released_finite("Predict", caller, samples, request_id, samples, logits)
        out = release(logits, rule)
        self._granted("Predict", caller, samples, request_id, out)
        return out

    def detect(
        self, x: Tensor, caller: str, request_id: str = ""
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A detection party's Predict: the boxes on (B, C, H, W) inputs in [0, 1] as rows
        (see :func:`release_detections`), under the same grant, budget and audit as
        :meth:`predict`."""
        samples = self._admit("Predict", "predict", x, caller, request_id)
        found = on_model_thread(self._detections, x)  # B x {boxes, scores, labels}
        offset = getattr(self.model, "label_offset", 0)
        out = release_detections(found, self.policy.predict, offset)
        self._granted("Predict", caller, samples, request_id, *out)
        return out

    def bn_feedback(
        self,
        x: Tensor,
        caller: str,
        objective: GeneratorObjective,
        adversary_logits: Tensor | None = None,
        grad_logits: Tensor | None = None,
        half: bool = False,
        request_id: str = "",
    ) -> Feedback:
        """The teacher-side generator loss on (B, C, H, W) inputs in [0, 1] -- BatchNorm
        statistics (paper 003, Eq. 3-4), entropies and the adversarial term against the
        caller's ``adversary_logits`` (Eq. 5) -- and the input gradient of its total plus
        ``<grad_logits, logits>``.

        The batch is one BN-statistics sample: it is never split. Charged ``cost`` samples of
        budget per input. With ``half`` the tensors come back as float16.
        """
        rule = self.policy.bn_feedback
        method = "BatchNormFeedback"
        extra = {"objective.adversary_logits": adversary_logits, "grad_logits": grad_logits}
        cost = rule.cost if rule else 1
        samples = self._admit(method, "bn_feedback", x, caller, request_id, cost, extra)
        if half and not rule.allow_half:
            error = PolicyDenied(f"party {self.name}: float16 answers are not allowed")
            self._deny(error, method, caller, samples, request_id, "denied")
        if objective.adversarial and adversary_logits is None:
            error = InvalidRequest("objective.adversary_logits", "required when adversarial != 0")
            self._deny(error, method, caller, samples, request_id, "invalid")
        feedback = on_model_thread(self.teacher_side, x, objective, adversary_logits, grad_logits)
        self._released_finite(method, caller, samples, request_id, samples * cost,
                              feedback.logits, feedback.input_grad)  # fmt: skip
        if half:
            feedback = Feedback(feedback.logits.half(), feedback.losses, feedback.input_grad.half())
        self._granted(method, caller, samples, request_id, feedback.logits, feedback.input_grad,
                      charged=samples * cost)  # fmt: skip
        return feedback

    def own_teacher(self) -> OwnTeacher:
        """The model as its own generator's teacher (party-side synthesis)."""
        info = TeacherInfo.from_dict(self.info.model_dump())
        return OwnTeacher(info, self.teacher_side, self._logits)

    def teacher_side(
        self,
        x: Tensor,
        objective: GeneratorObjective,
        adversary_logits: Tensor | None = None,
        grad_logits: Tensor | None = None,
    ) -> Feedback:
        """The computation behind :meth:`bn_feedback`, without policy, budget or audit (the
        party's own generator uses it directly)."""
        inputs = x.detach().to(device=self.device, dtype=self._dtype).requires_grad_(True)
        if adversary_logits is not None:
            adversary_logits = adversary_logits.to(device=self.device)
        with torch.enable_grad(), bn_statistics_loss(self.model) as layer_losses:
            logits = self.model(self._normalize(inputs))  # (B, K)
            bn_loss = torch.stack(layer_losses).sum() if layer_losses else logits.new_zeros(())
            total, losses = teacher_side_loss(logits, bn_loss, objective, adversary_logits)
            if grad_logits is not None:
                total = total + (logits * grad_logits.to(logits)).sum()
            if total.requires_grad:
                (input_grad,) = torch.autograd.grad(total, inputs)
            else:
                input_grad = torch.zeros_like(inputs)
        return Feedback(logits.detach().cpu(), losses, input_grad.detach().cpu())

    def synthesize(
        self,
        caller: str,
        session: str,
        params: dict,
        steps: int,
        samples: int,
        half: bool = False,
        request_id: str = "",
    ) -> Synthesis:
        """Advance the caller's party-side generator and release generated images only.

        Charged ``steps x batch_size x cost`` samples of budget; audited once per call.
        """
        rule, method = self.policy.synthesize, "Synthesize"
        batch = int(params.get("batch_size", 0))
        self._authorize(method, "synthesize", caller, samples, request_id)
        try:
            if not 0 <= steps <= rule.max_steps:
                raise InvalidRequest("steps", f"{steps} is outside 0..{rule.max_steps}")
            if not 1 <= samples <= rule.max_samples:
                raise InvalidRequest("samples", f"{samples} is outside 1..{rule.max_samples}")
            SynthesisSessions.config(params)
        except (InvalidRequest, ValueError, TypeError) as error:
            if not isinstance(error, InvalidRequest):
                error = InvalidRequest("params", str(error))
            self._deny(error, method, caller, samples, request_id, "invalid")
        try:
            self._reserve(caller, steps * batch * rule.cost)
        except BudgetExceeded as error:
            self._deny(error, method, caller, samples, request_id, "budget_exceeded")
        try:
            result = self._synthesis.advance(caller, session, params, steps, samples)
        except ValueError as error:
            self._deny(
                InvalidRequest("session", str(error)),
                method,
                caller,
                samples,
                request_id,
                "invalid",
            )
        if half:
            result = Synthesis(result.samples.half(), result.losses, result.steps_done)
        self._granted(method, caller, samples, request_id, result.samples,
                      charged=steps * batch * rule.cost)  # fmt: skip
        return result

    def layers(
        self,
        x: Tensor,
        layers: list[str],
        caller: str,
        *,
        gram: bool = False,
        half: bool = False,
        request_id: str = "",
    ) -> dict[str, Tensor]:
        """Outputs of ``layers`` on (t, C, H, W) inputs in [0, 1] (Activations), or their
        centered (t, t) Gram matrices (``gram=True``). Only layers the policy lists; charged
        ``cost`` samples of budget per input; the batch is never split (a Gram matrix spans
        it)."""
        method, capability = ("Gram", "gram") if gram else ("Activations", "activations")
        rule = getattr(self.policy, capability)
        samples = int(x.shape[0]) if x.ndim else 0
        self._authorize(method, capability, caller, samples, request_id)
        withheld = [layer for layer in layers if layer not in self._layers[method]]
        error: Exception | None = None
        if not layers:
            error = InvalidRequest("layers", "name at least one layer")
        elif withheld and self._layers[method] == layer_names(self.model):  # all released
            error = InvalidRequest("layers", f"the model has no layer {withheld[0]!r}")
        elif withheld:
            error = PolicyDenied(
                f"party {self.name}: {method} of layer {withheld[0]!r} is not released by "
                "its policy"
            )
        elif half and not rule.allow_half:
            error = PolicyDenied(f"party {self.name}: float16 answers are not allowed")
        elif gram and samples < 2:
            error = InvalidRequest("inputs.shape", "a Gram matrix needs at least 2 samples")
        if error is not None:
            decision = "invalid" if isinstance(error, InvalidRequest) else "denied"
            self._deny(error, method, caller, samples, request_id, decision)
        samples = self._admit(method, capability, x, caller, request_id, rule.cost)
        compute = layer_grams if gram else layer_outputs
        out = on_model_thread(compute, self.model, self._normalize(x), list(dict.fromkeys(layers)))
        out = {name: value.cpu() for name, value in out.items()}
        self._released_finite(method, caller, samples, request_id, samples * rule.cost,
                              *out.values())  # fmt: skip
        if half:
            out = {name: value.half() for name, value in out.items()}
        self._granted(method, caller, samples, request_id, *out.values(),
                      charged=samples * rule.cost)  # fmt: skip
        return out

    def export_weights(self, caller: str, request_id: str = "") -> tuple[dict, bytes]:
        """The architecture (``{"name", "kwargs"}`` of the model registry) and the state dict as
        safetensors bytes; only where the owner opted in (``policy.weights``)."""
        method = "ExportWeights"
        self._authorize(method, "weights", caller, 0, request_id)
        if not self.exportable:
            error = PolicyDenied(
                f"party {self.name}: its model is not a registered architecture, so its "
                "weights cannot be exported"
            )
            self._deny(error, method, caller, 0, request_id, "denied")
        state = {name: t.detach().cpu().contiguous() for name, t in self.model.state_dict().items()}
        payload = safetensors_bytes(state)
        self.audit.append(
            caller=caller,
            method=method,
            decision="granted",
            samples=0,
            bytes_out=len(payload),
            request_id=request_id,
        )
        return dict(self.model.arch), payload

"""The one place where the owner's policy is enforced.

:class:`PartyHandler` backs both the in-process :class:`party.local.LocalTeacher` and the gRPC
servicer; every call, granted or denied, is appended to the audit log.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from party.audit import AuditLog
from party.config import PartyConfig
from party.model import load_model
from protocol.errors import BudgetExceeded, InvalidRequest, PolicyDenied
from protocol.schemas import Normalization, PartyInfo, Policy, PredictPolicy

__all__ = ["BudgetExceeded", "InvalidRequest", "PartyHandler", "PolicyDenied", "release"]


def release(logits: Tensor, rule: PredictPolicy) -> Tensor:
    """Apply the policy's output form to (B, K) logits.

    logits -> ``z / T``; probs -> ``softmax(z / T)``; topk -> probs with zeros outside the
    ``top_k`` largest; label -> (B,) int64 argmax. Then optional rounding.
    """
    if rule.output == "label":
        return logits.argmax(dim=1)
    scaled = logits / rule.temperature
    if rule.output == "logits":
        out = scaled
    else:
        out = F.softmax(scaled, dim=1)
        if rule.output == "topk":
            k = min(rule.top_k, out.shape[1])
            top = out.topk(k, dim=1)
            out = torch.zeros_like(out).scatter_(1, top.indices, top.values)
    if rule.round_decimals is not None:
        out = torch.round(out, decimals=rule.round_decimals)
    return out.float()


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
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.class_names = list(class_names)
        self.input_shape = tuple(input_shape)
        self.policy = policy
        self.audit = audit
        self.normalization = normalization or Normalization()
        channels = self.input_shape[0]
        mean, std = self.normalization.mean, self.normalization.std
        if len(mean) not in (1, channels):
            raise ValueError(f"normalization has {len(mean)} values for {channels} channels")
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self._used: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PartyConfig) -> PartyHandler:
        return cls(
            name=config.name,
            model=load_model(config.model),
            class_names=config.class_names,
            input_shape=config.input_shape,
            policy=config.policy,
            audit=AuditLog(config.audit_log),
            normalization=config.normalization,
        )

    @property
    def info(self) -> PartyInfo:
        return PartyInfo(
            name=self.name,
            class_names=self.class_names,
            input_shape=self.input_shape,
            normalization=self.normalization,
            capabilities=self.policy.capabilities,
            output_form=self.policy.predict.output if self.policy.predict else "",
            max_batch=self.policy.max_batch,
        )

    def describe(self, caller: str, request_id: str = "") -> PartyInfo:
        info = self.info
        self.audit.append(
            caller=caller, method="Describe", decision="granted", request_id=request_id
        )
        return info

    def samples_used(self, caller: str) -> int:
        with self._lock:
            return self._used[caller]

    def _deny(
        self, error: Exception, caller: str, samples: int, request_id: str, decision: str
    ) -> NoReturn:
        self.audit.append(
            caller=caller,
            method="Predict",
            decision=decision,
            samples=samples,
            request_id=request_id,
            reason=str(error),
        )
        raise error

    def reject_malformed(self, caller: str, request_id: str, field: str, problem: str) -> NoReturn:
        """Audit and refuse a request that could not even be decoded."""
        self._deny(InvalidRequest(field, problem), caller, 0, request_id, "invalid")

    def _validate(self, x: Tensor) -> None:
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
        if not torch.isfinite(x).all():
            raise InvalidRequest("inputs.data", "contains NaN or infinite values")

    def _reserve(self, caller: str, samples: int) -> None:
        budget = self.policy.sample_budget
        with self._lock:
            if budget is not None and self._used[caller] + samples > budget:
                left = budget - self._used[caller]
                raise BudgetExceeded(
                    f"party {self.name}: sample budget of {budget} for {caller!r} would be "
                    f"exceeded ({left} left, {samples} asked)"
                )
            self._used[caller] += samples

    def predict(self, x: Tensor, caller: str, request_id: str = "") -> Tensor:
        """Predictions on (B, C, H, W) inputs in [0, 1], released as the policy says.

        Raises
        ------
        PolicyDenied, InvalidRequest, BudgetExceeded
            Each after the denial is audited.
        """
        samples = int(x.shape[0]) if x.ndim else 0
        rule = self.policy.predict
        if rule is None:
            error = PolicyDenied(f"party {self.name}: Predict is not granted by its policy")
            self._deny(error, caller, samples, request_id, "denied")
        try:
            self._validate(x)
        except InvalidRequest as error:
            self._deny(error, caller, samples, request_id, "invalid")
        try:
            self._reserve(caller, samples)
        except BudgetExceeded as error:
            self._deny(error, caller, samples, request_id, "budget_exceeded")
        with torch.no_grad():
            logits = self.model((x.float() - self._mean) / self._std)  # (B, K)
        out = release(logits, rule)
        self.audit.append(
            caller=caller,
            method="Predict",
            decision="granted",
            samples=samples,
            bytes_out=out.numel() * out.element_size(),
            request_id=request_id,
        )
        return out

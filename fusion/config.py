"""Hyper-parameters as data: every method's configuration is a frozen pydantic model whose
fields carry their defaults, bounds and choices, written once.

A job's ``method.params`` section validates into the same model (the coordinator adds only
what a job says besides, such as which party is the generalist), so a default is never
restated and a typo in a choice is a one-line error naming the field.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Config(BaseModel):
    """Base of every configuration: unknown keys are errors, values cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=Config)


def validated(model: type[C], values: dict) -> C:
    """``model(**values)``, or a ``ValueError`` of one line naming the first bad field (for
    values that arrive from elsewhere, e.g. a request)."""
    try:
        return model(**values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise ValueError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type where the message is empty): what a
    one-line refusal quotes of a library's exception."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Read a YAML file into a pydantic model, with command-line overrides; every problem becomes one
:class:`ConfigError` line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A bad configuration file: ``str(error)`` has one line per problem, each naming the
    file, the field and the problem."""


def _field(data: object, error: dict) -> str:
    """The dotted path of the failing field as the user wrote it: location segments that are
    not keys of the document (the tags pydantic adds for tagged unions) are left out."""
    parts, node = [], data
    for part in error["loc"]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and error["type"] != "missing":
            continue  # a union tag, not a key
        else:
            node = None
        parts.append(str(part))
    if error["type"] == "union_tag_invalid":
        parts.append(error["ctx"]["discriminator"].strip("'"))
    return ".".join(parts) or "(top level)"


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``data`` with each ``key.path=value`` of ``overrides`` set, the value read as YAML
    (``student.epochs=3``, ``method.params.rule=max-prob``, ``parties.0.address=h:50051``);
    missing mappings on the way are created. A malformed override raises :class:`ConfigError`
    naming it."""
    for override in overrides:
        key, equals, text = override.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise ConfigError(f"--set {override}: expected key.path=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {override}: the value is not valid YAML") from None
        node: object = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:depth]) or "the top level"
                    raise ConfigError(f"--set {override}: {where} has no item {part}")
                index: int | str = int(part)
            elif isinstance(node, dict):
                index = part
                if not last and node.get(part) is None:
                    node[part] = {}
            else:
                raise ConfigError(f"--set {override}: {'.'.join(parts[:depth])} is not a mapping")
            if last:
                node[index] = value
            else:
                node = node[index]
    return data


def load_yaml(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Load ``path``, apply ``overrides`` (:func:`apply_overrides`) and validate it as
    ``model``.

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, a bad override, or validation failures: one line per
        problem, each naming the file and the field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = [f"{path}: {_field(data, e)}: {_plain(e)}" for e in error.errors()]
        raise ConfigError("\n".join(lines)) from None


def _plain(error: dict) -> str:
    """pydantic's message in the user's words: no "Value error, " prefix, no regular
    expression."""
    if error["type"] == "string_pattern_mismatch":
        return f"{error['input']!r} does not have the expected form"
    return error["msg"].removeprefix("Value error, ")

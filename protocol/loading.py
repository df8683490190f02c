"""Read a YAML file into a pydantic model; every problem becomes one :class:`ConfigError` line."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A bad configuration file: ``str(error)`` is one line naming the file, field and problem."""


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


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Load ``path`` and validate it as ``model``.

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, or a validation failure (the first one, with its field).
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
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        more = error.error_count() - 1
        extra = f" (and {more} more)" if more else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {_field(data, first)}: {message}{extra}") from None

"""Reading a YAML file a person wrote (a site policy, an agent config, a job): a key given twice is refused, not
silently overwritten, and every problem (syntax, duplicate key, a value of the wrong type or range) is one line that
names the file and, where YAML knows it, the line. No traceback reaches the person who has to fix the file.

With `strict`, values are validated as JSON would carry them, in pydantic's strict mode: `true` is not 1, "5" is not
5, a date is not a string. A policy field such as `min_cohort: true` must be refused, not read as 1.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

M = TypeVar("M", bound=BaseModel)
_MERGE = "tag:yaml.org,2002:merge"
_MAX_ERRORS = 5


class ConfigFileError(ValueError):
    """A file that cannot be used as it is; the message is one line: which file, where, what is wrong."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping giving the same key twice is an error (YAML says keys are
    unique; PyYAML keeps the last one, so `min_cohort: 100` then `min_cohort: 1` would mean 1)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise ConstructorError(None, None, f"duplicate key {key!r} (first given on line {first + 1})",
                                       key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 reads `1e-5` as a number; PyYAML (YAML 1.1) reads it as text unless it has a dot (`1.0e-5`). Helm writes
# `1e-05`, and people write `delta: 1e-5`: under strict types that would be refused as "not a number".
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error or a duplicate key raises ConfigFileError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        what = exc.problem or exc.context or "not valid YAML"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise ConfigFileError(f"{where}: {what}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"{path}: cannot read: {reason}") from None


def validate_text(model: type[M], text: str, source: str, what: str, *, strict: bool = False) -> M:
    """`text` (YAML) as a `model`, every problem one line naming `source` (see the module docstring)."""
    data = load_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigFileError(f"{source}: {what} must be a YAML mapping (key: value lines)")
    try:
        if strict:
            return model.model_validate_json(json.dumps(data, default=_not_json(source)), strict=True)
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(f"{source}: not a valid {what}: {describe(exc, text)}") from None


def validate_file(model: type[M], path: Path, what: str, *, strict: bool = False) -> M:
    return validate_text(model, read_text(path), str(path), what, strict=strict)


def describe(exc: ValidationError, text: str | None = None) -> str:
    """pydantic's errors as one line: `line N: field.path: message; ...` (the line when `text` locates it)."""
    root = _compose(text) if text is not None else None
    parts = []
    errors = exc.errors()
    for e in errors[:_MAX_ERRORS]:
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "json-or-python")))]
        field = ".".join(str(p) for p in loc) or "(file)"
        line = _line_of(root, loc) if root is not None else None
        msg = " ".join(str(e["msg"]).split()).removeprefix("Value error, ")
        parts.append(f"{'line ' + str(line) + ': ' if line else ''}{field}: {msg}")
    more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
    return "; ".join(parts) + more


def _not_json(source: str) -> Any:
    def refuse(value: object) -> Any:
        if isinstance(value, dt.date | dt.datetime):
            raise ConfigFileError(f"{source}: {value} reads as a date; quote it if it is meant as text")
        raise ConfigFileError(f"{source}: a value of YAML type {type(value).__name__} is not allowed ({value!r:.60})")
    return refuse


def _compose(text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _line_of(node: Node | None, loc: list[int | str]) -> int | None:
    """The 1-based line of the value at `loc` (or of the deepest part of it found)."""
    line = None
    for part in loc:
        if isinstance(node, MappingNode):
            found = next((v for k, v in node.value if isinstance(k, ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            found = node.value[part]
        else:
            found = None
        if found is None:
            break
        node, line = found, found.start_mark.line + 1
    return line

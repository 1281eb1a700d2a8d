"""The configuration reference (`docs/configuration.md`) and the commented example configs
(`fedsilo agent|aggregator example-config`), both generated from the pydantic models.

A field's documentation is its `description`, or else the comments written beside it in the model's source (the
lines just above it and any at the end of its line): the comments the code already keeps are the reference, so
the two cannot drift apart. `python -m fedsilo.configdoc` rewrites the reference; `tests/unit/test_configdoc.py`
fails when the file is stale.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
import types
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import AnyUrl, BaseModel
from pydantic.fields import FieldInfo

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


# ------------------------------------------------------------------ field documentation
@cache
def _source_comments(cls: type) -> dict[str, str]:
    """field name -> the comments beside its declaration in `cls`'s own source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    standalone: dict[int, str] = {}
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            line = tok.start[0]
            (standalone if not tok.line[: tok.start[1]].strip() else trailing)[line] = text
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            line = node.lineno - 1
            while line in standalone:
                above.insert(0, standalone[line])
                line -= 1
            after = [trailing[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in trailing]
            text = " ".join(part for part in [*above, *after] if part)
            if text:
                out[node.target.id] = text
    return out


def field_doc(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    if info.description:
        return info.description
    for cls in model.__mro__:
        if name in inspect.get_annotations(cls):
            return _source_comments(cls).get(name, "")
    return ""


def model_doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


# ------------------------------------------------------------------ types, constraints, defaults
def _models_in(t: Any) -> Iterator[type[BaseModel]]:
    if isinstance(t, type) and issubclass(t, BaseModel):
        yield t
    for arg in get_args(t):
        yield from _models_in(arg)


def type_name(t: Any) -> str:
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map of {type_name(args[0])} → {type_name(args[1])}"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return f"[{t.__name__}](#{t.__name__.lower()})"
    if isinstance(t, type) and issubclass(t, AnyUrl):
        return "URL"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(t, getattr(t, "__name__", str(t)))


def constraints(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            out.append(f"≥ {m.ge}")
        if isinstance(m, annotated_types.Gt):
            out.append(f"> {m.gt}")
        if isinstance(m, annotated_types.Le):
            out.append(f"≤ {m.le}")
        if isinstance(m, annotated_types.Lt):
            out.append(f"< {m.lt}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} long")
        if isinstance(m, annotated_types.MaxLen):
            out.append(f"at most {m.max_length} long")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def default_value(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, AnyUrl):
        return str(value)
    return value


def inline(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


# ------------------------------------------------------------------ the reference
SECTIONS: list[tuple[str, str, str]] = [
    ("Agent", "agent.config:AgentConfig", "`fedsilo agent run --config agent.yaml`; one per site."),
    ("Aggregator", "aggregator.config:AggregatorConfig", "`fedsilo aggregator serve --config aggregator.yaml`."),
    ("Site policy", "agent.policy:SitePolicy", "The file an agent config's `policy_file` names; default-deny."),
    ("Job", "federation.jobs:JobSpec", "What `fedsilo job submit` sends; validated by the aggregator and by every "
                                       "site."),
]


def _load(path: str) -> type[BaseModel]:
    module, name = path.split(":")
    cls: type[BaseModel] = getattr(__import__(module, fromlist=[name]), name)
    return cls


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        default = "required" if info.is_required() else f"`{inline(default_value(info))}`"
        meaning = field_doc(model, name, info)
        limits = constraints(info)
        if limits:
            meaning = f"{meaning} ({limits})" if meaning else limits
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(info.annotation)} | {default} | {meaning} |")
    return rows


def reference() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the pydantic models by `python -m fedsilo.configdoc`; do not edit by hand "
        "(tests/unit/test_configdoc.py fails when it is stale). -->",
        "",
        "Every file is YAML; unknown keys are errors. A key left out takes its default. `fedsilo agent example-config`"
        " and `fedsilo aggregator example-config` print a commented starting point for a local layout.",
        "",
    ]
    done: set[type[BaseModel]] = set()
    for title, path, what in SECTIONS:
        root = _load(path)
        out += [f"## {title}: `{root.__name__}`", "", what, ""]
        queue = [root]
        while queue:
            model = queue.pop(0)
            if model in done:
                continue
            done.add(model)
            out.append(f"### {model.__name__}")
            out.append("")
            doc = model_doc(model)
            if doc:
                out += [" ".join(doc.split()), ""]
            out += _table(model)
            out.append("")
            for info in model.model_fields.values():
                queue += [m for m in _models_in(info.annotation) if m not in done and m not in queue]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------ example configs
def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 100 - len(indent))] if text else []


def example_yaml(model: type[BaseModel], values: dict[str, Any], indent: str = "") -> list[str]:
    """Every field of `model`, with its comment: those in `values` set, the others commented out at their default."""
    lines: list[str] = []
    for name, info in model.model_fields.items():
        lines += _comment(field_doc(model, name, info), indent)
        if name in values:
            value = values[name]
            nested = next(_models_in(info.annotation), None)
            if isinstance(value, dict) and nested is not None and get_origin(info.annotation) is not dict:
                lines.append(f"{indent}{name}:")
                lines += example_yaml(nested, value, indent + "  ")
            else:
                lines.append(f"{indent}{name}: {inline(value)}")
        elif info.is_required():
            raise ValueError(f"{model.__name__}.{name} is required: give it a value")
        else:
            lines.append(f"{indent}# {name}: {inline(default_value(info))}")
    return lines


def agent_example(site: str, pki: str, aggregator_url: str, broker: str) -> str:
    from agent.config import AgentConfig

    host, _, port = broker.rpartition(":")
    values = {
        "site": site,
        "policy_file": f"policy-{site}.yaml",
        "aggregator_public_key": f"{pki}/job-signing.pub",
        "tls": {"ca_file": f"{pki}/ca.crt", "cert_file": f"{pki}/site/{site}.crt",
                "key_file": f"{pki}/site/{site}.key"},
        "broker": {"host": host, "port": int(port)},
        "aggregator_url": aggregator_url,
        "state_dir": f"state/agent-{site}",
        "status_host": "127.0.0.1",
    }
    head = [f"# Agent of site {site}, for a local layout (paths relative to the directory the agent runs in).",
            "# Run: fedsilo agent run --config agent.yaml. Every key: docs/configuration.md#agentconfig", ""]
    return "\n".join(head + example_yaml(AgentConfig, values)) + "\n"


def aggregator_example(pki: str, port: int, broker: str) -> str:
    from aggregator.config import AggregatorConfig

    host, _, bport = broker.rpartition(":")
    values = {
        "host": "127.0.0.1",
        "port": port,
        "state_url": "sqlite:///state/aggregator.db",
        "blob_url": "file://state/blobs",
        "report_dir": "reports",
        "broker": {"host": host, "port": int(bport)},
        "tls": {"ca_file": f"{pki}/ca.crt", "cert_file": f"{pki}/aggregator/aggregator.crt",
                "key_file": f"{pki}/aggregator/aggregator.key"},
        "signing_key": f"{pki}/job-signing.key",
    }
    head = ["# The aggregator, for a local layout (paths relative to the directory it runs in).",
            "# Run: fedsilo aggregator serve --config aggregator.yaml. Every key: "
            "docs/configuration.md#aggregatorconfig", ""]
    return "\n".join(head + example_yaml(AggregatorConfig, values)) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE
    target.write_text(reference())
    print(target)

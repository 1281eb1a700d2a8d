"""`fedsilo job init`: propose a job from one site's CSV: its header, and the types and categories of at most the
first `max_rows` rows (never the rest of the file).

A column is numeric when every value present parses as a number, categorical otherwise; a categorical
vocabulary lists the values seen at least `min_count` times. A vocabulary is data: every site receives the job,
so the file says so and lists what was left out, for the site to review before anyone submits it. Columns that look
like identifiers (by name), are constant, empty, or have more categories than `max_levels` are left out and named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from pydantic import ValidationError

from federation.jobs import JobSpec
from federation.schema import field_errors
from fedsilo.certs import CertError, check_site_name
from fedsilo.localinit import header
from fedsilo.workspace import LocalError

# Names of columns that identify a person or a record: never proposed as features.
IDENTIFIER = re.compile(r"(^|[_\-. ])(id|uuid|guid|mrn|ssn|nhs|name|first_?name|last_?name|surname|email|phone|"
                        r"address|zip|postcode|dob|birth_?date|date_of_birth)$", re.IGNORECASE)
COLUMN_NAME = re.compile(r"^[A-Za-z0-9_.\- ]{1,128}$")  # what `federation.schema.ColumnName` accepts
MISSING = ["?"]  # besides pandas' defaults (NA, N/A, null, NaN, empty, ...)


class JobInitError(LocalError):
    pass


@dataclass
class Proposal:
    numeric: list[str] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    dropped_levels: dict[str, int] = field(default_factory=dict)  # column -> rare values left out
    left_out: dict[str, str] = field(default_factory=dict)  # column -> why
    rows_read: int = 0


def _flow(values: Sequence[object]) -> str:
    return yaml.safe_dump(list(values), default_flow_style=True, width=math.inf, allow_unicode=True).strip()


def _scalar(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _numeric(values: pd.Series[str]) -> bool:
    return bool(pd.to_numeric(values, errors="coerce").notna().all())


def infer(frame: pd.DataFrame, target: str, exclude: Sequence[str], max_levels: int, min_count: int) -> Proposal:
    p = Proposal(rows_read=len(frame))
    for col in frame.columns:
        if col == target:
            continue
        values = frame[col].dropna()
        if col in exclude:
            p.left_out[col] = "excluded with --exclude"
        elif not COLUMN_NAME.fullmatch(col):
            p.left_out[col] = "its name has characters a job cannot name (letters, digits, _ . - and space only)"
        elif IDENTIFIER.search(col):
            p.left_out[col] = "its name says it identifies a person or record"
        elif values.empty:
            p.left_out[col] = "no value in the rows read"
        elif values.nunique() == 1:
            p.left_out[col] = "one value only in the rows read: it carries nothing here (a site label?)"
        elif _numeric(values):
            p.numeric.append(col)
        else:
            counts = values.value_counts()
            kept = sorted(str(v) for v, n in counts.items() if n >= min_count)
            if len(kept) > max_levels:
                p.left_out[col] = (f"text with {len(kept)} values seen {min_count}+ times (over --max-levels "
                                   f"{max_levels}): free text or an identifier?")
            elif len(kept) < 2:
                p.left_out[col] = f"fewer than two values seen {min_count}+ times"
            else:
                p.categorical[col] = kept
                if len(kept) < len(counts):
                    p.dropped_levels[col] = len(counts) - len(kept)
    return p


def target_rule(values: pd.Series[str], target: str, positive: Sequence[str],
                positive_above: float | None) -> tuple[dict[str, object], str]:
    """The job's `target:` mapping and a comment saying what it means."""
    seen = sorted(values.dropna().astype(str).unique())
    shown = ", ".join(seen[:10]) + (", ..." if len(seen) > 10 else "")
    if positive and positive_above is not None:
        raise JobInitError("give either --positive VALUE (repeatable) or --positive-above NUMBER, not both")
    if positive:
        if not set(positive) & set(seen):
            raise JobInitError(f"none of {', '.join(positive)} appears in target column {target!r} (values seen: "
                               f"{shown})")
        return ({"column": target, "positive_values": list(positive)},
                f"positive when {target} is {' or '.join(positive)}")
    numbers = pd.to_numeric(values.dropna(), errors="coerce")
    if positive_above is not None:
        if numbers.isna().any():
            raise JobInitError(f"target column {target!r} is not numeric (values seen: {shown}), so --positive-above "
                               "cannot apply; use --positive VALUE")
        return {"column": target, "positive_above": positive_above}, f"positive when {target} > {positive_above:g}"
    if not numbers.isna().any() and set(numbers.unique()) <= {0, 1}:
        return {"column": target, "positive_above": 0}, f"positive when {target} is 1"
    raise JobInitError(f"say which values of target column {target!r} are positive: --positive VALUE (repeatable) "
                       f"or --positive-above NUMBER (values seen: {shown})")


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (slug or "data")[:63]


def propose_job(
    csv_path: Path, target: str, sites: Sequence[str], *, positive: Sequence[str] = (),
    positive_above: float | None = None, name: str | None = None, dataset: str | None = None,
    purpose: str = "research", rounds: int = 10, max_rows: int = 10_000, max_levels: int = 30, min_count: int = 5,
    exclude: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """A commented job YAML (validated as a JobSpec) and the notes to show the person who asked for it."""
    if not sites:
        raise JobInitError("name the federation's sites with --sites SITE,SITE,...")
    for site in sites:
        try:
            check_site_name(site)
        except CertError as exc:
            raise JobInitError(str(exc)) from None
    columns = header(csv_path)
    if target not in columns:
        raise JobInitError(f"{csv_path} has no column {target!r} to predict; its columns are: {', '.join(columns)}")
    try:
        frame = pd.read_csv(csv_path, nrows=max_rows, dtype=str, na_values=MISSING, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise JobInitError(f"cannot read {csv_path}: {exc}") from None
    rule, meaning = target_rule(frame[target], target, positive, positive_above)
    p = infer(frame, target, exclude, max_levels, min_count)
    if not p.numeric and not p.categorical:
        raise JobInitError(f"no column of {csv_path} can be a feature: " + "; ".join(
            f"{c}: {why}" for c, why in p.left_out.items()))
    dataset = dataset or _slug(target)
    name = name or f"{dataset}-logreg"
    text = _render(csv_path, p, rule, meaning, sites, name=name, dataset=dataset, purpose=purpose, rounds=rounds,
                   min_count=min_count)
    try:
        JobSpec.from_yaml(text)
    except ValidationError as exc:
        raise JobInitError("the proposed job is not valid: " + "; ".join(
            f"{f}: {m}" for f, m in field_errors(exc))) from None
    notes = [f"read the header and {p.rows_read} row(s) of {csv_path} (at most --rows {max_rows})",
             f"numeric: {', '.join(p.numeric) or '(none)'}",
             f"categorical: {', '.join(p.categorical) or '(none)'} (vocabularies are data: review them)",
             f"target: {meaning}"]
    notes += [f"left out {c}: {why}" for c, why in p.left_out.items()]
    return text, notes


def _render(csv_path: Path, p: Proposal, rule: dict[str, object], meaning: str, sites: Sequence[str], *, name: str,
            dataset: str, purpose: str, rounds: int, min_count: int) -> str:
    out = [
        f"# Job proposed by `fedsilo job init` from the header and the first {p.rows_read} rows of {csv_path.name}.",
        "# Review it before it is submitted. A categorical vocabulary is data: every site receives this job, so",
        "# check that listing these values discloses nothing a site may not share. A value seen fewer than",
        f"# {min_count} times was left out of its vocabulary; at a site it encodes like a missing value.",
    ]
    if p.left_out:
        out.append("# Columns left out:")
        out += [f"#   {c}: {why}" for c, why in p.left_out.items()]
    cats = [f"    - {{name: {_scalar(c)}, vocabulary: {_flow(v)}}}"
            + (f"   # {p.dropped_levels[c]} rare value(s) left out" if c in p.dropped_levels else "")
            for c, v in p.categorical.items()]
    target = "{" + ", ".join(f"{k}: {_flow(v) if isinstance(v, list) else _scalar(v)}" for k, v in rule.items()) + "}"
    out += [
        f"name: {_scalar(name)}",
        f"purpose: {_scalar(purpose)}          # each site's policy must allow this purpose",
        "dataset:",
        f"  name: {dataset}          # the name each site offers its file under (its policy's `datasets:` key)",
        "  validation_fraction: 0.3333333333   # each site holds out this share, stratified, for evaluation",
        "  split_seed: 42",
        "features:",
        f"  numeric: {_flow(p.numeric)}   # median-imputed and standardized with each site's own statistics",
    ]
    out += ["  categorical:   # one-hot over the vocabulary; missing or unlisted values encode as all zeros",
            *cats] if cats else ["  categorical: []"]
    out += [
        f"  target: {target}   # {meaning}",
        "model: {name: logreg}   # a registered model, by name: logreg or mlp (with hidden: [units, ...])",
        "hyperparameters: {epochs: 5, learning_rate: 0.1, batch_size: 32, optimizer: sgd, weight_decay: 0.0}",
        "# Update-level DP: each site's round update is clipped to clip_norm and noised with std",
        "# noise_multiplier * clip_norm; ε (RDP accountant, at delta) covers a site's whole dataset.",
        "privacy: {clip_norm: 0.3, noise_multiplier: 0.4, delta: 1.0e-5}",
        f"rounds: {rounds}",
        f"sites: {_flow(list(sites))}",
        f"min_sites: {len(sites)}",
        "round_deadline_s: 60",
        "accept_deadline_s: 30",
        "seed: 0",
    ]
    return "\n".join(out) + "\n"

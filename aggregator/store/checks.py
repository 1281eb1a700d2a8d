"""What a stored row must look like to be used: the wire's bounds (`federation.bounds`), checked again on read.

The boundary keeps bad values out, but a row written by an older version, by hand, or by a bug must never stop the
aggregator: at start-up `SqlStore.quarantine_active` moves every row of a running job that fails these checks to
the `quarantine` table (and fails the job with the reason), and every reader skips such rows instead of raising.
Each check returns None for a good row, else the reason.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from federation.bounds import MAX_EPSILON, MAX_LOSS, MAX_ROUND, MAX_SAMPLES, finite_in

__all__ = ["MAX_EPSILON", "finite_in"]
from federation.jobs import JobSpec

Row = dict[str, Any]
INF = float("inf")


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _bad(checks: list[tuple[bool, str]]) -> str | None:
    bad = [what for ok, what in checks if not ok]
    return "; ".join(bad) if bad else None


def _optional(value: Any, low: float, high: float) -> bool:
    return value is None or finite_in(value, low, high)


def job(row: Row, spec: JobSpec | str | None = None) -> str | None:
    """`spec`: the row's spec already parsed by the caller (`job_spec`), else parsed here."""
    spec = job_spec(row) if spec is None else spec
    if isinstance(spec, str):
        return spec
    return _bad([(_int_in(row["round"], 0, MAX_ROUND), f"round {row['round']!r}"),
                 (finite_in(row["created_at"], 0, INF), "created_at"), (finite_in(row["updated_at"], 0, INF),
                                                                         "updated_at")])


def job_spec(row: Row) -> JobSpec | str:
    """The row's spec, or why it does not load."""
    try:
        return JobSpec.model_validate_json(row["spec"])
    except (ValidationError, ValueError, TypeError) as exc:
        return f"spec does not load: {str(exc)[:300]}"


def strict_json(text: Any) -> Any:
    """JSON as the API may serve it: NaN and Infinity are refused (Python's json accepts them by default)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def update(row: Row) -> str | None:
    return _bad([
        (_int_in(row["num_samples"], 1, MAX_SAMPLES), f"num_samples {row['num_samples']!r}"),
        (finite_in(row["train_loss"], 0, MAX_LOSS), f"train_loss {row['train_loss']!r}"),
        (_optional(row["epsilon"], 0, MAX_EPSILON), f"epsilon {row['epsilon']!r}"),
        (finite_in(row["received_at"], 0, INF), "received_at"),
        (_int_in(row["round"], 1, MAX_ROUND), f"round {row['round']!r}"),
    ])


def evaluation(row: Row) -> str | None:
    return _bad([
        (_int_in(row["n"], 0, MAX_SAMPLES), f"n {row['n']!r}"),
        (_optional(row["loss"], 0, MAX_LOSS), f"loss {row['loss']!r}"),
        (_optional(row["auc"], 0, 1), f"auc {row['auc']!r}"),
    ])


def round_(row: Row) -> str | None:
    return _bad([
        (_int_in(row["n_samples"], 0, MAX_SAMPLES * 1000), f"n_samples {row['n_samples']!r}"),
        (_optional(row["train_loss"], 0, MAX_LOSS), f"train_loss {row['train_loss']!r}"),
        (finite_in(row["started_at"], 0, INF) and finite_in(row["deadline"], 0, INF), "times"),
    ])


def decision(row: Row) -> str | None:
    try:
        reasons = strict_json(row["reasons"])
    except (ValueError, TypeError):
        reasons = None
    return _bad([
        (isinstance(reasons, list) and all(isinstance(r, str) for r in reasons), "reasons is not a list of text"),
        (_optional(row["epsilon_planned"], 0, MAX_EPSILON), f"epsilon_planned {row['epsilon_planned']!r}"),
        (finite_in(row["at"], 0, INF), "at"),
    ])


def site(row: Row) -> str | None:
    try:
        info = strict_json(row["info"])
    except (ValueError, TypeError):
        info = None
    return _bad([(isinstance(info, dict), "info is not a JSON object"), (finite_in(row["at"], 0, INF), "at"),
                 (row["state"] in ("online", "offline"), f"state {row['state']!r}")])

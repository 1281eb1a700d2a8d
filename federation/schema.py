"""Feature schema of a tabular job: declared once in the job, applied identically at every site.

The schema fixes column order and categorical vocabularies so that every site builds the same input
layout without sharing any statistics; imputation and scaling statistics stay local (see `agent.data`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ColumnName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\- ]+$")]


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Each problem pydantic found, as (dotted field path, message): for API answers and CLI messages alike."""
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]


class Frozen(BaseModel):
    """Base for wire and config models: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalFeature(Frozen):
    name: ColumnName
    # Values are compared as strings (CSV cells are read as text), so `True` in a file matches "True" here.
    vocabulary: list[str] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _unique_vocabulary(self) -> CategoricalFeature:
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"vocabulary of {self.name!r} has duplicate values")
        return self


class TargetSpec(Frozen):
    """How a target column becomes the binary label: exactly one of `positive_above` / `positive_values`."""

    column: ColumnName
    positive_above: float | None = None
    positive_values: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> TargetSpec:
        if (self.positive_above is None) == (self.positive_values is None):
            raise ValueError("set exactly one of positive_above or positive_values")
        return self


class FeatureSchema(Frozen):
    numeric: list[ColumnName] = Field(default_factory=list, max_length=10_000)
    categorical: list[CategoricalFeature] = Field(default_factory=list, max_length=10_000)
    target: TargetSpec

    @model_validator(mode="after")
    def _distinct_columns(self) -> FeatureSchema:
        names = self.columns()
        if not names:
            raise ValueError("the schema declares no feature")
        if len(set(names)) != len(names):
            raise ValueError("a column is declared twice")
        if self.target.column in names:
            raise ValueError(f"target column {self.target.column!r} is also a feature")
        return self

    def columns(self) -> list[str]:
        """Feature columns in input order (numeric first, then categorical)."""
        return [*self.numeric, *(c.name for c in self.categorical)]

    def input_dim(self) -> int:
        """Width of the encoded input: one per numeric column plus one-hot width per categorical."""
        return len(self.numeric) + sum(len(c.vocabulary) for c in self.categorical)

    def encoded_names(self) -> list[str]:
        return [*self.numeric, *(f"{c.name}={v}" for c in self.categorical for v in c.vocabulary)]

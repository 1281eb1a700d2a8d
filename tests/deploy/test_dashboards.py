"""The Grafana dashboards in deploy/grafana: valid dashboard JSON whose every PromQL expression (panel targets
and template variables) names only metrics the aggregator or the agent export.

The exported names come from the services' own registries at test time, so a metric added later counts and a
renamed one fails here. The expressions are parsed by a real PromQL parser (promql-parser), after Grafana's
variables are replaced by values of the right kind."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
from prometheus_client import CollectorRegistry

from agent.status_server import AgentMetrics
from aggregator.metrics import AggregatorMetrics
from aggregator.tracking import TrackingMetrics
from tests.deploy._tools import GRAFANA

DASHBOARDS = sorted(GRAFANA.glob("*.json"))
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
# Grafana's built-in variables, as PromQL of the same kind (durations, times).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "${__range}": "6h"}


@functools.cache
def exported_names() -> frozenset[str]:
    """Every sample name a scrape of the aggregator or an agent can contain."""
    registries: list[CollectorRegistry] = [AgentMetrics().registry]
    aggregator = AggregatorMetrics()
    TrackingMetrics(aggregator.registry)  # the aggregator's tracking hub registers these on the same registry
    registries.append(aggregator.registry)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return frozenset(names)


def selectors(node: Any) -> list[str]:
    """Metric names selected anywhere in a parsed PromQL expression."""
    if isinstance(node, promql.VectorSelector):
        named = [m.value for m in node.matchers.matchers if m.name == "__name__"] if node.matchers else []
        return [node.name] if node.name else named
    if isinstance(node, promql.MatrixSelector):
        return selectors(node.vector_selector)
    if isinstance(node, promql.BinaryExpr):
        return selectors(node.lhs) + selectors(node.rhs)
    if isinstance(node, promql.AggregateExpr):
        return selectors(node.expr) + (selectors(node.param) if node.param is not None else [])
    if isinstance(node, promql.Call):
        return [name for arg in node.args for name in selectors(arg)]
    if isinstance(node, promql.ParenExpr | promql.UnaryExpr | promql.SubqueryExpr):
        return selectors(node.expr)
    return []


def parse(expr: str) -> Any:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)  # dashboard variables only ever stand inside label matchers
    return promql.parse(expr)


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(METRIC, label))."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {var['name']}: expected label_values(METRIC, label), got {query!r}"
            out.append((f"variable {var['name']!r}", match.group(1)))
    return out


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_there_are_the_three_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["federation-overview.json", "job-training.json",
                                            "site-privacy-budget.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid_grafana_json(path: Path) -> None:
    d = load(path)
    assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"]) and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert d["panels"], "a dashboard without panels"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in d["panels"]:
        assert panel["title"] and panel["type"] and panel["targets"], panel.get("title")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboard_uids_are_unique() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def unknown_metrics(expr: str) -> list[str]:
    """Metrics an expression selects that neither the aggregator nor an agent exports (ValueError: not PromQL)."""
    names = selectors(parse(expr))
    assert names, f"selects no metric: {expr!r}"
    return sorted(set(names) - exported_names())


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_promql_expression_names_only_exported_metrics(path: Path) -> None:
    for where, expr in expressions(load(path)):
        try:
            unknown = unknown_metrics(expr)
        except ValueError as exc:
            pytest.fail(f"{path.name}, {where}: not valid PromQL: {expr!r} ({exc})")
        assert not unknown, f"{path.name}, {where}: metrics nobody exports: {unknown} in {expr!r}"


def test_the_metric_check_catches_an_unknown_metric() -> None:
    good = 'sum by (site) (rate(fedsilo_updates_received_total{job=~"$job"}[$__rate_interval]))'
    assert unknown_metrics(good) == []
    assert unknown_metrics(good + " / on() group_left fedsilo_no_such_metric") == ["fedsilo_no_such_metric"]
    assert unknown_metrics("rate(fedsilo_updates_received[5m])") == ["fedsilo_updates_received"], \
        "counters are exported with _total"

"""A report of a thousand-site job stays readable: the per-site curves and the per-round table are summarized as
quantiles with the worst sites named, and the full site list is folded away."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aggregator import plots
from aggregator.tracking.html import render
from federation.jobs import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"


def summary(n_sites: int, rounds: int = 4) -> dict[str, Any]:
    sites = [f"site-{i:04d}" for i in range(n_sites)]
    # Site i's AUC rises with i: site-0000 is the worst everywhere.
    history = [{"round": r, "complete": True, "train_loss": 0.5, "sites_reporting": n_sites, "samples": 100,
                "duration_s": 1.0, "global": {"n": 100 * n_sites, "auc": 0.8, "loss": 0.5},
                "sites": {s: {"n": 100, "auc": 0.5 + 0.4 * i / n_sites + 0.01 * r, "loss": 0.7 - 0.2 * i / n_sites}
                          for i, s in enumerate(sites)}} for r in range(rounds)]
    return {"job_id": "big-0001", "name": "big", "state": "finished", "reason": "", "round": rounds - 1,
            "rounds": rounds - 1, "requester": "ops", "created_at": 0.0, "updated_at": 1.0,
            "spec": JobSpec.from_yaml(EXAMPLE.read_text()).model_dump(mode="json"), "history": history,
            "sites": {s: {"decision": "accepted", "reasons": [], "epsilon": 1.0} for s in sites},
            "decisions": {"accepted": n_sites}, "rejections": []}


def test_a_thousand_sites_are_summarized_not_listed_column_by_column() -> None:
    s = summary(1000)
    page = render(s, {"global": plots.plot_global(s), "sites": plots.plot_sites(s)})
    head = re.search(r"<h2>AUC and loss per round</h2>.*?<thead>(.*?)</thead>", page, re.S)
    assert head is not None
    assert "median" in head.group(1) and "site-0500" not in head.group(1)
    assert "lowest validation AUC" in page and "site-0000" in page.split("<details>")[0]
    assert page.count("<details>") == 1 and "All 1000 sites (1000 accepted)" in page
    assert plots.worst_sites(plots.site_series(s, "auc"), higher_is_worse=False, k=3) == [
        "site-0000", "site-0001", "site-0002"]
    q = plots.quantiles(plots.site_series(s, "auc"))
    assert list(q) == [0, 1, 2, 3] and q[0][0] < q[0][2] < q[0][4]


def test_a_few_sites_keep_a_column_pair_each() -> None:
    s = summary(4)
    page = render(s, {"global": plots.plot_global(s)})
    assert all(f"site-000{i} AUC" in page for i in range(4)) and "<details>" not in page

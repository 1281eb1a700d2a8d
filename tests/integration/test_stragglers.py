"""Stragglers and vanishing sites on a real federation: a round closes at its quorum without waiting for a silent
participant; a hung agent (no heartbeats, connection still open) is shown offline after the heartbeat timeout and
online again when it recovers; a killed agent is shown offline at once through its MQTT last will."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation
from tests.integration.test_federation import policy_for
from tests.participants import Mallory
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("stragglers")
    files = split_by_center(root / "data")
    policies = {s: policy_for(s, {"heart-disease": files[s]}) for s in ("cleveland", "hungary")}
    with LocalFederation(root, policies, extra_identities=("mallory",), heartbeat_s=0.5,
                         aggregator_extra={"site_timeout_s": SITE_TIMEOUT_S}) as f:
        f.wait_sites_online(["cleveland", "hungary"])
        yield f


def site_row(fed: LocalFederation, site: str) -> dict[str, Any]:
    return next(s for s in fed.client.sites() if s["site"] == site)


def online_gauge_matches_the_store(fed: LocalFederation) -> bool:
    """`fedsilo_sites_online` counts exactly the sites the store shows online."""
    metrics = fed.client.request("GET", "/metrics").decode()
    gauge = float(re.search(r"^fedsilo_sites_online (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    return gauge == sum(1 for s in fed.client.sites() if s["state"] == "online")


def test_rounds_close_at_quorum_without_waiting_for_a_silent_site(fed: LocalFederation) -> None:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    # Mallory accepts and then never uploads. The deadline is far beyond the test's patience: only the quorum
    # (2 of 3) can close these rounds in time.
    job.update(sites=["cleveland", "hungary", "mallory"], min_sites=2, quorum=0.6, rounds=3, round_deadline_s=3600)
    job["privacy"].update(clip_norm=1.0, noise_multiplier=0.1)
    job_id = fed.client.submit(yaml.safe_dump(job))

    async def accept_and_stay_silent() -> None:
        mallory = Mallory(fed)
        link = await mallory.join(job_id)
        await mallory.wait_task(1)
        await link.stop()

    asyncio.run(accept_and_stay_silent())
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    assert summary["sites"]["mallory"]["decision"] == "accepted"
    assert [h["sites_reporting"] for h in summary["history"][1:]] == [2, 2, 2]


def test_a_hung_agent_is_shown_offline_after_the_heartbeat_timeout_and_online_again(fed: LocalFederation) -> None:
    agent = fed.agents["hungary"]
    os.kill(agent.pid, signal.SIGSTOP)  # alive, connection open, no last will: only the timeout can tell
    try:
        wait_for(lambda: site_row(fed, "hungary")["state"] == "offline", 60, "hungary offline")
        row = site_row(fed, "hungary")
        assert "no heartbeat" in row["offline_reason"]
        assert time.time() - row["at"] > SITE_TIMEOUT_S  # `at` is still the last heartbeat, not the sweep
        metrics = fed.client.request("GET", "/metrics").decode()
        assert 'fedsilo_site_up{site="hungary"} 0.0' in metrics
        assert site_row(fed, "cleveland")["state"] == "online"
        assert online_gauge_matches_the_store(fed)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_for(lambda: site_row(fed, "hungary")["state"] == "online", 10, "hungary back online")
    assert site_row(fed, "hungary")["offline_reason"] is None
    assert online_gauge_matches_the_store(fed)


def test_a_killed_agent_is_shown_offline_through_its_last_will(fed: LocalFederation) -> None:
    fed.stop_agent("cleveland", kill=True)
    try:
        # Well within the heartbeat timeout: the broker publishes the will as soon as the connection drops.
        wait_for(lambda: site_row(fed, "cleveland")["state"] == "offline", 10, "cleveland offline")
        assert "last will" in site_row(fed, "cleveland")["offline_reason"]
    finally:
        fed.start_agent("cleveland")
    wait_for(lambda: site_row(fed, "cleveland")["state"] == "online", 20, "cleveland back online")

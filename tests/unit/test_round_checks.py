"""Which answer an upload gets from the job's round state: a job that is being recovered (its runner registered,
its round not yet read back) asks the site to retry; only a job that is not running refuses for good."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.rounds import RoundTransitions
from aggregator.runner import JobRunner
from aggregator.store.base import RoundRow
from aggregator.strategies import FedAvg
from aggregator.validation import Rejection
from federation.jobs import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SPEC = JobSpec.from_yaml(EXAMPLE.read_text())


def runner(state: str, rnd: int | None) -> JobRunner:
    r = JobRunner("job-1", SPEC, {}, "sha", FedAvg(1.0), state=state)
    if rnd is not None:
        r.round = RoundRow("job-1", rnd, "train", "open", time.time(), time.time() + 60, None, "sha", None, 0, 0, None)
    return r


def rejection(r: JobRunner, rnd: int) -> Rejection:
    with pytest.raises(Rejection) as info:
        RoundTransitions._current(r, rnd, "train")
    return info.value


def test_a_running_job_without_its_round_yet_asks_for_a_retry() -> None:
    r = rejection(runner("running", None), 2)
    assert (r.status, r.reason) == (503, "job_recovering")


@pytest.mark.parametrize("state", ["offered", "finished", "failed", "cancelled"])
def test_a_job_that_is_not_running_refuses_for_good(state: str) -> None:
    r = rejection(runner(state, 2), 2)
    assert (r.status, r.reason) == (409, "job_not_running")


def test_the_open_round_is_accepted_and_others_refused() -> None:
    r = runner("running", 2)
    assert RoundTransitions._current(r, 2, "train") is r.round
    assert rejection(r, 1).reason == "late_update" and rejection(r, 3).reason == "round_not_open"

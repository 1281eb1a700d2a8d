"""A real federation (Mosquitto, the aggregator and agent processes, mutual TLS) whose sites train through a
FedML-style trainer registered in their policies; and a trainer returning an enormous update, which the site's
privacy engine still clips before anything leaves."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.state import AgentState
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text())
PRIVACY = {"clip_norm": 0.5, "noise_multiplier": 0.2, "delta": 1e-5}


def registration(folder: Path, cls: str, module: str = "hospital_trainers", **extra: Any) -> dict[str, Any]:
    return {"import_path": f"{module}:{cls}",
            "source_sha256": hashlib.sha256((folder / f"{module}.py").read_bytes()).hexdigest(),
            "models": ["logreg"], "datasets": ["heart-disease"], "search_path": str(folder), **extra}


def policy(site: str, data: Path, trainers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    p = example_policy(site, {"heart-disease": data})
    p["privacy"]["min_noise_multiplier"] = 0.05
    p["privacy"]["max_epsilon_per_job"] = 1e4
    p["privacy"]["budgets"]["heart-disease"]["epsilon"] = 1e5
    p["operations"]["max_concurrent_jobs"] = 3
    p["trainers"] = trainers
    return p


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("fedml-fed")
    files = split_by_center(root / "data")
    folder = root / "site-trainers"  # installed on the sites, never shipped by the aggregator
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parent / "fedml_trainers.py", folder / "hospital_trainers.py")
    # Each site registers its own trainer under the name jobs use: cleveland runs it in a separate interpreter
    # (as it would a virtualenv holding fedml), hungary inside its agent.
    separate = registration(folder, "SgdTrainer", python=sys.executable)
    policies = {
        "cleveland": policy("cleveland", files["cleveland"],
                            {"fedml-sgd": separate, "huge": registration(folder, "HugeTrainer")}),
        "hungary": policy("hungary", files["hungary"], {"fedml-sgd": registration(folder, "SgdTrainer")}),
    }
    with LocalFederation(root, policies, heartbeat_s=1.0) as f:
        yield f


def submit(fed: LocalFederation, **changes: Any) -> str:
    return fed.client.submit(yaml.safe_dump({**JOB, "sites": ["cleveland", "hungary"], "privacy": PRIVACY,
                                             "round_deadline_s": 30, "accept_deadline_s": 20, **changes}))


def log_events(fed: LocalFederation, site: str, event: str, job_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in fed.log(f"agent-{site}").read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == event and e.get("job") == job_id]


def test_sites_train_through_their_registered_fedml_trainer(fed: LocalFederation) -> None:
    job_id = submit(fed, trainer="fedml-sgd", rounds=3, min_sites=2)
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert all(set(h["sites"]) == {"cleveland", "hungary"} for h in history)
    assert history[-1]["global"]["auc"] > 0.75
    for site in ("cleveland", "hungary"):
        assert summary["sites"][site]["decision"] == "accepted" and summary["sites"][site]["epsilon"] > 0
        ran = log_events(fed, site, "trained_with_registered_trainer", job_id)
        assert [e["round"] for e in ran] == [1, 2, 3]
        assert {e["import_path"] for e in ran} == {"hospital_trainers:SgdTrainer"}
        assert {e["separate_process"] for e in ran} == {site == "cleveland"}
        assert len(log_events(fed, site, "round_trained", job_id)) == 3


def test_a_huge_update_from_a_trainer_leaves_clipped(fed: LocalFederation) -> None:
    job_id = submit(fed, trainer="huge", rounds=2, min_sites=1)
    summary = fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    # hungary has not registered this trainer: it refuses, with the reason.
    hungary = summary["sites"]["hungary"]
    assert hungary["decision"] == "refused"
    assert hungary["reasons"] == ["trainer 'huge' is not registered in this site's policy (registered: fedml-sgd)"]
    # cleveland's releases (the exact bytes it uploaded) are bounded by the clip plus the noise, though the
    # trainer moved every parameter by a million; the aggregator accepted them as plausible.
    state = AgentState(fed.workdir / "state" / "agent-cleveland" / "agent.db")
    c, sigma = PRIVACY["clip_norm"], PRIVACY["noise_multiplier"]
    for rnd in (1, 2):
        release = state.release(job_id, rnd)
        assert release is not None and release.sent
        sent = decode(release.payload)
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))
        d = sum(v.size for v in sent.values())
        assert 0 < norm <= c + sigma * c * (math.sqrt(d) + 6)  # ‖z‖ > σC(√d+6) has probability below e^-18
    state.close()
    assert [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert all(set(h["sites"]) == {"cleveland"} for h in summary["history"][1:])

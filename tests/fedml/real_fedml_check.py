"""`make test-fedml` only (not collected by the default suite): a short real federation in which cleveland trains
through a subclass of the real `fedml.core.ClientTrainer`, run by the agent in `.venv-fedml` (fedml 0.9.6 and its
pins cannot live beside fedsilo's own dependencies), and hungary through its own duck-typed trainer."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation
from tests.fedml.test_fedml_federation import JOB, PRIVACY, log_events, policy, registration

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def fedml_python() -> str:
    python = os.environ.get("FEDSILO_FEDML_PYTHON")
    if not python:
        pytest.fail("FEDSILO_FEDML_PYTHON is not set: run `make test-fedml` (scripts/test-fedml.sh)")
    out = subprocess.run([python, "-c", "import fedml; print(fedml.__version__)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "0.9.6"
    return python


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, fedml_python: str) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("real-fedml")
    files = split_by_center(root / "data")
    folder = root / "site-trainers"
    folder.mkdir()
    shutil.copy(HERE / "fedml_real_trainer.py", folder / "fedml_real_trainer.py")
    shutil.copy(HERE / "fedml_trainers.py", folder / "hospital_trainers.py")
    real = registration(folder, "FedMLLogRegTrainer", module="fedml_real_trainer", python=fedml_python)
    policies = {
        "cleveland": policy("cleveland", files["cleveland"], {"hospital-lr": real}),
        "hungary": policy("hungary", files["hungary"], {"hospital-lr": registration(folder, "SgdTrainer")}),
    }
    with LocalFederation(root, policies, heartbeat_s=1.0) as f:
        yield f


def test_a_site_trains_through_a_real_fedml_client_trainer(fed: LocalFederation) -> None:
    job_id = fed.client.submit(yaml.safe_dump({
        **JOB, "sites": ["cleveland", "hungary"], "min_sites": 2, "rounds": 3, "trainer": "hospital-lr",
        "privacy": PRIVACY, "round_deadline_s": 90, "accept_deadline_s": 30}))
    summary = fed.wait_job(job_id, timeout=300)
    assert summary["state"] == "finished", summary["reason"]
    history = summary["history"]
    assert all(set(h["sites"]) == {"cleveland", "hungary"} for h in history)
    assert history[-1]["global"]["auc"] > 0.75
    ran = log_events(fed, "cleveland", "trained_with_registered_trainer", job_id)
    assert [e["round"] for e in ran] == [1, 2, 3]
    assert {(e["import_path"], e["separate_process"]) for e in ran} == {
        ("fedml_real_trainer:FedMLLogRegTrainer", True)}

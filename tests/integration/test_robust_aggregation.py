"""One poisoned participant in a real federation: three hospital agents train honestly while `mallory` (played
by the test, with a real site certificate) answers every round with the current global model sign-flipped and
scaled up to the largest norm the aggregator's validation still accepts, claiming a hundred thousand records.

Plain FedAvg follows the claimed count and is wrecked; coordinate-wise median, trimmed mean and norm-bounded
FedAvg keep the global model's AUC (scored here on the pooled validation splits of the three hospitals).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from aggregator.validation import noise_norm_bound
from bench.federated import score, site_splits
from federation.jobs import JobSpec
from federation.messages import EvalMetrics, UpdateEnvelope
from federation.tensors import decode, encode, sha256_hex
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation
from tests.integration.test_federation import policy_for
from tests.participants import Mallory, fetch_blob, post_update

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
HOSPITALS = ("cleveland", "hungary", "va-long-beach")
ROUNDS = 4


@pytest.fixture(scope="module")
def fed_and_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFederation, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("robust")
    files = split_by_center(root / "data")
    policies = {s: policy_for(s, {"heart-disease": files[s]}) for s in HOSPITALS}
    with LocalFederation(root, policies, extra_identities=("mallory",), heartbeat_s=1.0) as fed:
        fed.wait_sites_online(list(HOSPITALS))
        yield fed, {s: files[s] for s in HOSPITALS}


def poisoned(global_bytes: bytes, bound: float) -> bytes:
    """−0.95·bound along the global model: the strongest sign flip the norm check lets through."""
    w = decode(global_bytes)
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in w.values())))
    return encode({k: (-0.95 * bound * v / norm).astype(np.float32) for k, v in w.items()})


def run_poisoned_job(fed: LocalFederation, job: dict[str, Any]) -> tuple[dict[str, Any], bytes, list[int]]:
    spec = JobSpec.model_validate(job)
    bound = noise_norm_bound(spec, spec.features.input_dim() + 1)
    job_id = fed.client.submit(yaml.safe_dump(job))

    async def attack() -> list[int]:
        mallory = Mallory(fed)
        link = await mallory.join(job_id)
        statuses = []
        for rnd in range(1, ROUNDS + 1):
            task = await mallory.wait_task(rnd, within=60)
            assert task.model_sha256 is not None
            body = poisoned(await asyncio.to_thread(fetch_blob, fed, "mallory", task.model_sha256), bound)
            env = UpdateEnvelope(job_id=job_id, round=rnd, site="mallory", num_samples=100_000,
                                 sha256=sha256_hex(body), evaluation=EvalMetrics(n=100, loss=0.1, auc=0.99),
                                 train_loss=0.1, epsilon=1.0)
            statuses.append((await asyncio.to_thread(post_update, fed, "mallory", env, body))[0])
        await link.stop()
        return statuses

    statuses = asyncio.run(attack())
    summary = fed.wait_job(job_id, timeout=120)
    return summary, fed.client.request("GET", f"/api/v1/jobs/{job_id}/model"), statuses


@pytest.mark.parametrize("strategy", ["fedavg", "median", "trimmed_mean", "fedavg_normbound"])
def test_one_poisoned_site_wrecks_fedavg_but_not_the_robust_strategies(
    fed_and_files: tuple[LocalFederation, dict[str, Path]], strategy: str
) -> None:
    fed, files = fed_and_files
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(sites=[*HOSPITALS, "mallory"], min_sites=3, rounds=ROUNDS, round_deadline_s=10,
               aggregation=strategy, aggregation_params={"trim_fraction": 0.25})
    # Per-site DP from a seeded start: the poison is a sign flip of the global model, and the update-level noise
    # gives it the most room the norm check allows (a per-patient job's updates are bounded by C alone).
    job.update(model={"name": "logreg"}, privacy={"unit": "site", "clip_norm": 1.0, "noise_multiplier": 0.1},
               hyperparameters={"epochs": 5, "learning_rate": 0.1, "batch_size": 32})
    summary, model, statuses = run_poisoned_job(fed, job)

    assert summary["state"] == "finished", summary["reason"]
    assert statuses == [200] * ROUNDS  # every poisoned update passed validation: only the strategy stands between
    assert all(h["sites_reporting"] >= 3 for h in summary["history"][1:])
    spec = JobSpec.model_validate(job)
    _, pooled_auc = score(decode(model), spec, site_splits(files, spec))
    if strategy == "fedavg":
        assert pooled_auc < 0.6, pooled_auc
    else:
        assert pooled_auc > 0.8, pooled_auc

"""Record-level DP (the patient unit): DP-SGD's draws come from the OS's CSPRNG, a record-level update carries no
update-level noise, each site calibrates its own σ and refuses with its numbers, accountants agree, and the ledger
keeps each unit apart across a crash."""

from __future__ import annotations

import math
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant
from scipy import stats  # type: ignore[import-untyped]

from agent.daemon import load_data
from agent.data import SiteData
from agent.dpsgd import train_dpsgd
from agent.policy import SitePolicy, evaluate
from agent.privacy import BudgetExhaustedError, PrivacyEngine
from agent.privacy_policy import BudgetPolicy, SitePrivacy, plan_privacy
from agent.record_plan import RecordPlan, record_plan
from agent.state import AgentState, Release
from agent.trainer import round_seed
from aggregator.validation import Rejection, check_update
from federation import noise
from federation.accounting import dpsgd_epsilon, rdp_epsilon, sampled_gaussian
from federation.faults import EXIT_CODE
from federation.jobs import JobSpec
from federation.messages import EvalMetrics
from federation.models import build_model, get_weights, set_weights
from federation.privacy import epsilon_for
from federation.tensors import decode, encode, l2_norm, sha256_hex
from fedsilo.datasets import split_by_center
from tests.example_policies import site_policy

ROOT = Path(__file__).resolve().parents[2]
JOB: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text())
SPEC = JobSpec.model_validate(JOB)
EVAL = EvalMetrics(n=100, loss=0.6, auc=0.7)


def job(**privacy: Any) -> JobSpec:
    base = {k: v for k, v in JOB["privacy"].items() if k not in privacy}
    return JobSpec.model_validate({**JOB, "privacy": {**base, **privacy}})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_by_center(tmp_path_factory.mktemp("data"))


def decide(policy: SitePolicy, spec: JobSpec, spent: dict[str, float] | None = None) -> Any:
    d, _ = evaluate(policy, spec, policy.site, endpoints=[], spent=spent or {}, active_jobs=0, load=load_data)
    return d


def trained_delta(spec: JobSpec, data: SiteData, plan: RecordPlan) -> dict[str, np.ndarray]:
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
    set_weights(model, {k: np.full_like(v, 0.05) for k, v in get_weights(model).items()})
    before = get_weights(model)
    train_dpsgd(model, data.x_train, data.y_train, spec, plan)
    after = get_weights(model)
    return {k: after[k] - before[k] for k in before}


# ---------------------------------------------------------------- unpredictable noise
def test_dpsgd_draws_come_from_the_os_csprng_not_from_the_job_seed(files: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_data(site_policy("cleveland", files).datasets["heart-disease"], SPEC)
    plan = record_plan(SPEC, data.n_train)
    seed = round_seed(SPEC, "cleveland", 3)

    def run() -> dict[str, np.ndarray]:
        # Pin every generator the job's seed could drive, as an aggregator replaying the round would.
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return trained_delta(SPEC, data, plan)

    first, second = run(), run()
    # The same round, the same job seed, the same data and start: different releases.
    assert all(not np.allclose(first[k], second[k]) for k in first)
    assert l2_norm({k: first[k] - second[k] for k in first}) > 1e-3
    # And all of it flows through os.urandom: with the OS's bytes fixed, two runs agree exactly.
    fixed = np.random.default_rng(7)
    monkeypatch.setattr(os, "urandom", lambda n: fixed.bytes(n))
    a = run()
    fixed = np.random.default_rng(7)
    monkeypatch.setattr(os, "urandom", lambda n: fixed.bytes(n))
    b = run()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_the_csprng_sampler_is_a_standard_gaussian_and_poisson_sampling_keeps_its_rate() -> None:
    z = noise.standard_normal(40_000)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    counts = [len(noise.poisson_sample(1000, 0.2)) for _ in range(200)]
    assert abs(np.mean(counts) - 200) < 5  # sd of the mean: √(1000·0.2·0.8/200) ≈ 0.9
    assert not np.array_equal(noise.poisson_sample(1000, 0.5), noise.poisson_sample(1000, 0.5))
    assert noise.poisson_sample(10, 1.0).tolist() == list(range(10))
    assert noise.gaussian((3, 2), 0.0).shape == (3, 2)


# ---------------------------------------------------------------- no update-level noise
def test_a_record_level_update_carries_dpsgd_noise_alone(files: dict[str, Path], tmp_path: Path) -> None:
    """One full-batch step (sampling rate 1, so the batch is fixed and DP-SGD's noise is the only randomness):
    the released update differs from the noise-free one by lr·σC/B·z, z ~ N(0, I_d), and by nothing else."""
    lr, sigma, clip = 1.0, 4.0, 0.3
    spec = JobSpec.model_validate({**JOB, "rounds": 1, "hyperparameters": {
        "epochs": 1, "learning_rate": lr, "batch_size": 512}, "privacy": {
        "unit": "record", "record_noise_multiplier": sigma, "record_clip_norm": clip, "clip_norm": 10.0}})
    data = load_data(site_policy("cleveland", files).datasets["heart-disease"], spec)
    plan = record_plan(spec, data.n_train)
    assert (plan.sampling_rate, plan.steps_per_round) == (1.0, 1)
    quiet = trained_delta(spec, data, RecordPlan(**{**plan.__dict__, "noise_multiplier": 0.0}))
    released_delta = trained_delta(spec, data, plan)

    site = SitePrivacy(("record",), plan, 0.0, spec.privacy.clip_norm, spec.privacy.delta)
    engine = PrivacyEngine(AgentState(tmp_path / "agent.db"))
    up = engine.privatize("cleveland", "job-1", 1, spec, site, released_delta, data.n_train, EVAL, 0.5,
                          budget=BudgetPolicy(epsilon={"record": 10.0}))
    sent = decode(up.payload)
    d = sum(v.size for v in sent.values())
    scale = lr * sigma * clip / data.n_train  # DP-SGD's noise on one averaged step
    distance = l2_norm({k: sent[k] - quiet[k] for k in sent}) / scale
    assert math.sqrt(d) - 4 < distance < math.sqrt(d) + 4  # ‖z‖ for z ~ N(0, I_25): √25 ± 6 sd
    # Update-level noise at the example's σ 0.4 would have added ~0.4·10·√25 = 20 to the norm: none is there.
    assert l2_norm(sent) < l2_norm(quiet) + scale * (math.sqrt(d) + 4)
    assert [(s.unit, s.noise_multiplier) for s in up.envelope.privacy] == [("record", sigma)]
    assert up.envelope.epsilon == pytest.approx(plan.epsilon(1))
    # The aggregator checks it against the clip bound alone, and refuses a noised one that claims no noise.
    template = {k: np.zeros_like(v) for k, v in sent.items()}
    check_update(up.payload, up.envelope.sha256, template, spec, up.envelope)
    noised = encode({k: v + np.float32(3.0) for k, v in sent.items()})
    with pytest.raises(Rejection, match="record unit: no update-level noise"):
        check_update(noised, sha256_hex(noised), template, spec, up.envelope)


# ---------------------------------------------------------------- per-site calibration and refusals
def test_each_site_calibrates_its_own_sigma_for_the_per_patient_target(files: dict[str, Path]) -> None:
    plans = {}
    for site in files:
        d = decide(site_policy(site, files), SPEC)
        assert d.accepted, (site, d.reasons)
        assert d.plan is not None and d.plan.record is not None and d.plan.units == ("record",)
        plans[site] = d.plan.record
        assert 0.99 <= d.planned["record"] <= 1.0 and "site" not in d.planned
    # Fewer records → a higher sampling rate → less amplification → more noise for the same ε.
    assert plans["switzerland"].sampling_rate > plans["cleveland"].sampling_rate
    assert plans["switzerland"].noise_multiplier > plans["cleveland"].noise_multiplier


def test_a_policy_allowing_only_the_site_unit_refuses_a_record_level_job(files: dict[str, Path]) -> None:
    d = decide(site_policy("hungary", files, allowed_units=["site"]), SPEC)
    assert "privacy unit 'record' (per patient record) is not allowed here (allowed: site (per site))" in d.reasons
    d = decide(site_policy("hungary", files, required_units=["record"]), job(unit="site", noise_multiplier=0.4,
                                                                              target_epsilon=None,
                                                                              record_clip_norm=None))
    assert any("requires record-level DP" in r for r in d.reasons), d.reasons


def test_a_small_site_that_cannot_meet_the_target_refuses_with_its_numbers(files: dict[str, Path]) -> None:
    spec = job(max_record_noise_multiplier=12.0)
    big = decide(site_policy("cleveland", files), spec)
    assert big.accepted, big.reasons
    small = decide(site_policy("switzerland", files), spec)
    rp = record_plan(spec, 82)
    assert rp.noise_multiplier > 12
    assert (f"target ε 1 per patient needs DP-SGD σ {rp.noise_multiplier:.2f} here (82 training records, sampling "
            f"rate {rp.sampling_rate:.3f}, {rp.steps_per_round} steps a round × 10 rounds), above the job's ceiling "
            "12: this site has too few records for that target") in small.reasons


def test_the_floor_and_the_budgets_refuse_a_target_with_the_numbers(files: dict[str, Path]) -> None:
    rp = record_plan(SPEC, 195)  # hungary's training records
    d = decide(site_policy("hungary", files, min_record_noise_multiplier=20.0), SPEC)
    floor_eps = RecordPlan(**{**rp.__dict__, "noise_multiplier": 20.0}).epsilon()
    assert any(f"needs DP-SGD σ {rp.noise_multiplier:.3f} here (195 training records" in r and
               f"below this site's floor 20 (which allows at most ε {floor_eps:.2f} per patient here)" in r
               for r in d.reasons), d.reasons
    # hungary: 4 per patient per year; 3.5 already spent or reserved leaves 0.5 for a job that needs ~1.
    d = decide(site_policy("hungary", files), SPEC, spent={"record": 3.5, "site": 299.9})
    assert any("exceeds the remaining budget 0.50 of 4 per patient record for 'heart-disease' (195 training "
               "records" in r for r in d.reasons), d.reasons
    assert not any("per site" in r for r in d.reasons)  # a record-level job is not charged per site
    d = decide(site_policy("hungary", files, max_epsilon_per_job={"site": 100.0, "record": 0.5}), SPEC)
    assert any("per-job maximum 0.5" in r for r in d.reasons)
    d = decide(site_policy("hungary", files, max_epsilon_per_job={"site": 100.0}), SPEC)
    assert "this site's policy sets no per-job ε maximum per patient record" in d.reasons


def test_a_site_requiring_the_site_unit_applies_both_and_reports_both(files: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    policy = site_policy("hungary", files, required_units=["site"])
    d = decide(policy, SPEC)
    assert any("requires update-level noise as well" in r for r in d.reasons)
    spec = job(noise_multiplier=5.0)
    d = decide(policy, spec)
    assert d.accepted, d.reasons
    assert d.plan is not None and d.plan.units == ("record", "site") and d.plan.update_noise == 5.0
    assert set(d.planned) == {"record", "site"}
    assert d.planned["site"] == pytest.approx(epsilon_for(5.0, 10, 1e-5))
    state = AgentState(tmp_path / "agent.db")
    delta = {"0.weight": np.full((1, 25), 0.2, np.float32), "0.bias": np.full((1,), 0.2, np.float32)}
    budget = policy.privacy.budgets["heart-disease"]
    up = PrivacyEngine(state).privatize("hungary", "job-1", 1, spec, d.plan, delta, 195, EVAL, 0.5, budget=budget)
    assert {s.unit for s in up.envelope.privacy} == {"record", "site"}
    assert state.job_spend("job-1") == {"record": pytest.approx(d.plan.epsilon(1)["record"]),
                                        "site": pytest.approx(epsilon_for(5.0, 1, 1e-5))}
    # The update is noised now, and the aggregator's bound follows the envelope's claim of update-level noise.
    sent = decode(up.payload)
    assert l2_norm(sent) > spec.privacy.clip_norm
    check_update(up.payload, up.envelope.sha256, {k: np.zeros_like(v) for k, v in sent.items()}, spec, up.envelope)


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize(("sigma", "rate", "steps"), [
    (0.8, 0.16, 350), (1.0, 0.01, 1000), (2.0, 0.39, 150), (5.0, 0.16, 350), (8.0, 0.33, 40), (13.0, 0.78, 10),
    (4.0, 1.0, 10),
])
def test_the_reported_epsilon_is_never_below_what_rdp_certifies_minus_the_stated_tolerance(
        sigma: float, rate: float, steps: int) -> None:
    """The record unit reports min(RDP, PLD): both are upper bounds, PLD the tighter by up to ~12 % here. Stated
    tolerance: the reported ε is at least 85 % of Opacus's RDP ε for the same steps (an independent
    implementation), and never above dp-accounting's RDP ε."""
    reported = dpsgd_epsilon(sigma, rate, steps, 1e-5)
    opacus = RDPAccountant()
    opacus.history = [(sigma, rate, steps)]
    assert reported >= 0.85 * opacus.get_epsilon(1e-5)
    assert reported <= rdp_epsilon(sampled_gaussian(sigma, rate, steps), 1e-5) + 1e-9


def test_the_ledger_reports_what_the_plan_certifies_for_every_site(files: dict[str, Path]) -> None:
    for site in files:
        data = load_data(site_policy(site, files).datasets["heart-disease"], SPEC)
        plan = plan_privacy(SPEC, site_policy(site, files).privacy, data.n_train)
        assert plan.record is not None
        opacus = RDPAccountant()
        opacus.history = [(plan.record.noise_multiplier, plan.record.sampling_rate, plan.record.steps)]
        eps = plan.epsilon(SPEC.rounds)["record"]
        assert 0.85 * opacus.get_epsilon(1e-5) <= eps <= 1.0, site


# ---------------------------------------------------------------- the ledger per unit, across a crash
def release(state: AgentState, job_id: str, rnd: int, spend: dict[str, float]) -> None:
    state.record_release(Release(job_id, rnd, "heart-disease", 1.0, max(spend.values()), b"x", "{}", sent=False),
                         spend)


def test_the_ledger_keeps_each_unit_apart_and_loses_nothing_in_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    state = AgentState(db)
    release(state, "record-job", 1, {"record": 0.4})
    release(state, "record-job", 2, {"record": 0.6})
    release(state, "site-job", 1, {"site": 30.0})
    release(state, "both-job", 1, {"record": 0.2, "site": 10.0})
    state.close()
    # A process dies inside the ledger's transaction, after the release row and before its spend rows.
    code = ("from pathlib import Path; from agent.state import AgentState, Release; "
            f"s = AgentState(Path({str(db)!r})); "
            "s.record_release(Release('both-job', 2, 'heart-disease', 1.0, 0.3, b'y', '{}', sent=False), "
            "{'record': 0.3, 'site': 12.0})")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT),
                                                              "FEDSILO_FAILPOINT": "ledger_between_release_and_spend"},
                         timeout=60)
    assert out.returncode == EXIT_CODE
    state = AgentState(db)
    assert state.release("both-job", 2) is None  # all or nothing: no bytes without their spend
    assert state.spent("heart-disease", "record") == pytest.approx(0.6 + 0.2)
    assert state.spent("heart-disease", "site") == pytest.approx(30.0 + 10.0)
    assert state.job_spend("both-job") == {"record": 0.2, "site": 10.0}
    # The round is released again after the restart, and counted once in each unit.
    release(state, "both-job", 2, {"record": 0.3, "site": 12.0})
    assert state.spent("heart-disease", "record") == pytest.approx(0.6 + 0.3)
    assert state.spent("heart-disease", "site") == pytest.approx(30.0 + 12.0)
    # A budget is checked in each unit a job is charged in: the site ledger has room, the record one not.
    spec = job(noise_multiplier=5.0)
    plan = SitePrivacy(("record", "site"), record_plan(spec, 200), 5.0, 1.0, 1e-5)
    delta = {"0.weight": np.zeros((1, 25), np.float32), "0.bias": np.zeros((1,), np.float32)}
    with pytest.raises(BudgetExhaustedError, match="per patient record"):
        PrivacyEngine(state).privatize("cleveland", "new-job", 1, spec, plan, delta, 200, EVAL, 0.5,
                                       budget=BudgetPolicy(epsilon={"record": 0.95, "site": 1000.0}))
    assert state.release("new-job", 1) is None


def test_a_ledger_written_before_units_keeps_its_spend_in_the_jobs_unit(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "agent.db")
    db.executescript("""
      CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, decision TEXT NOT NULL, reasons TEXT NOT NULL,
        closed INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL, dataset TEXT NOT NULL DEFAULT '',
        epsilon_planned REAL NOT NULL DEFAULT 0);
      CREATE TABLE releases (job_id TEXT NOT NULL, round INTEGER NOT NULL, dataset TEXT NOT NULL,
        noise_multiplier REAL NOT NULL, epsilon REAL NOT NULL, payload BLOB NOT NULL, envelope TEXT NOT NULL,
        sent INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL, PRIMARY KEY (job_id, round));""")
    site_spec = job(unit="site", noise_multiplier=0.4, target_epsilon=None, record_clip_norm=None)
    for job_id, spec, eps in (("old-site", site_spec, 20.0), ("old-record", SPEC, 0.7)):
        db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?)",
                   (job_id, spec.model_dump_json(), "accepted", "[]", 0, 1.0, "heart-disease", eps * 2))
        db.execute("INSERT INTO releases VALUES (?,?,?,?,?,?,?,?,?)",
                   (job_id, 1, "heart-disease", 1.0, eps, b"x", "{}", 1, 2.0))
    db.commit()
    db.close()
    state = AgentState(tmp_path / "agent.db")
    assert state.spent("heart-disease", "site") == 20.0 and state.spent("heart-disease", "record") == 0.7
    assert state.committed("heart-disease", "record") == pytest.approx(1.4)  # its plan still reserved
    state.close()
    assert AgentState(tmp_path / "agent.db").spent("heart-disease", "site") == 20.0  # migrated once, not twice

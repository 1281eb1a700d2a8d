"""The trainer adapter: hash pinning, the checks on what a trainer returns, the policy's refusals, and that
clipping bounds whatever a trainer hands back."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import py_compile
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from agent.data import SiteData
from agent.fedml_adapter import (
    TrainerRefusedError,
    TrainerRegistration,
    check_params,
    train_registered,
    trainer_refusals,
)
from agent.policy import DatasetPolicy, SitePolicy, evaluate
from agent.privacy import PrivacyEngine
from agent.privacy_policy import BudgetPolicy, SitePrivacy
from agent.state import AgentState
from federation.jobs import JobSpec
from federation.models import build_model, get_weights
from federation.tensors import decode

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = Path(__file__).resolve().parent / "fedml_trainers.py"
# A registered trainer cannot give record-level DP, so these jobs use the site unit (update-level noise).
JOB: dict[str, Any] = {**yaml.safe_load((ROOT / "examples" / "heart-disease.yaml").read_text()),
                       "privacy": {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.4, "delta": 1e-5}}
DIM = 25  # the heart-disease schema's encoded width


def job(**changes: Any) -> JobSpec:
    return JobSpec.model_validate({**JOB, "trainer": "fedml-sgd", **changes})


@pytest.fixture
def trainer_dir(tmp_path: Path) -> Path:
    """A site's own folder holding a copy of the test trainers (so a test may edit it)."""
    folder = tmp_path / "site-trainers"
    folder.mkdir()
    shutil.copy(TRAINERS, folder / "hospital_trainers.py")
    return folder


def register(folder: Path, cls: str = "SgdTrainer", **extra: Any) -> TrainerRegistration:
    sha = hashlib.sha256((folder / "hospital_trainers.py").read_bytes()).hexdigest()
    return TrainerRegistration.model_validate({
        "import_path": f"hospital_trainers:{cls}", "source_sha256": sha, "models": ["logreg", "mlp"],
        "datasets": ["heart-disease"], "search_path": str(folder), **extra,
    })


def data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    return x, y


def global_model(spec: JobSpec) -> torch.nn.Module:
    return build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden, seed=3)


def run(reg: TrainerRegistration, spec: JobSpec | None = None) -> tuple[torch.nn.Module, dict[str, np.ndarray], float]:
    spec = spec or job()
    model = global_model(spec)
    before = get_weights(model)
    x, y = data()
    loss = train_registered(model, {"fedml-sgd": reg}, spec, x, y, seed=7, round_idx=1)
    return model, before, loss


# ---------------------------------------------------------------- a trainer that behaves
def test_a_registered_trainer_trains_the_job_model(trainer_dir: Path) -> None:
    model, before, loss = run(register(trainer_dir))
    after = get_weights(model)
    assert set(after) == set(before)
    assert any(not np.allclose(after[k], before[k]) for k in before)
    assert math.isfinite(loss) and 0 < loss < math.log(2) + 0.2  # it learnt the easy synthetic target
    # Deterministic for the same round seed.
    model2, _, _ = run(register(trainer_dir))
    assert all(np.array_equal(get_weights(model2)[k], after[k]) for k in after)


def test_a_trainer_in_its_own_interpreter_gives_the_same_result(trainer_dir: Path) -> None:
    """`python:` runs the trainer in another process (e.g. a virtualenv with fedml): same bytes, same result,
    and what it prints cannot corrupt the response."""
    in_process, _, _ = run(register(trainer_dir))
    separate, _, _ = run(register(trainer_dir, python=sys.executable))
    a, b = get_weights(in_process), get_weights(separate)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    chatty, _, _ = run(register(trainer_dir, "ChattyTrainer", python=sys.executable))
    assert all(np.allclose(get_weights(chatty)[k], a[k], atol=1e-6) for k in a)


def test_a_trainer_that_raises_is_refused_without_its_message(trainer_dir: Path) -> None:
    for extra in ({}, {"python": sys.executable}):
        with pytest.raises(TrainerRefusedError) as exc:
            run(register(trainer_dir, "RaisingTrainer", **extra))
        assert "RuntimeError in train" in str(exc.value)
        assert "4711" not in str(exc.value)  # the exception's text may hold data; it stays in the site's log


# ---------------------------------------------------------------- hash pinning
def test_source_changed_after_registration_is_refused(trainer_dir: Path) -> None:
    reg = register(trainer_dir)
    assert trainer_refusals({"fedml-sgd": reg}, job()) == []
    source = trainer_dir / "hospital_trainers.py"
    source.write_text(source.read_text() + "\n# one more line\n")
    reasons = trainer_refusals({"fedml-sgd": reg}, job())
    assert len(reasons) == 1 and "changed since it was registered, so it is not loaded" in reasons[0]
    # Also at round time: a job accepted before the change does not run the changed code.
    with pytest.raises(TrainerRefusedError, match="changed since it was registered"):
        run(reg)


def test_stale_bytecode_never_replaces_the_pinned_source(trainer_dir: Path) -> None:
    """The bytes that were hashed are the bytes that run: a .pyc beside the source is not used, even a valid one
    that Python's own import would take without looking at the source (unchecked-hash bytecode)."""
    reg = register(trainer_dir)
    other = trainer_dir.parent / "other" / "hospital_trainers.py"
    other.parent.mkdir()
    other.write_text("class SgdTrainer:\n"
                     "    def __init__(self, *a, **k):\n"
                     "        raise RuntimeError('stale bytecode ran')\n")
    cache = trainer_dir / "__pycache__" / f"hospital_trainers.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(other), cfile=str(cache), dfile=str(trainer_dir / "hospital_trainers.py"),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, doraise=True)
    # The check is worth something only if a plain import would run the stale bytecode.
    spec = importlib.util.spec_from_file_location("hospital_trainers", trainer_dir / "hospital_trainers.py")
    assert spec is not None and spec.loader is not None
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    with pytest.raises(RuntimeError, match="stale bytecode ran"):
        plain.SgdTrainer()
    model, before, _ = run(reg)
    assert any(not np.allclose(get_weights(model)[k], before[k]) for k in before)


def test_missing_module_and_non_trainer_class_are_refused(trainer_dir: Path) -> None:
    reg = register(trainer_dir).model_copy(update={"import_path": "no_such_module:SgdTrainer"})
    assert "'no_such_module' is not found" in trainer_refusals({"fedml-sgd": reg}, job())[0]
    with pytest.raises(TrainerRefusedError, match="lacks train, test of FedML's ClientTrainer interface"):
        run(register(trainer_dir, "NotATrainer"))
    with pytest.raises(TrainerRefusedError, match="is not a class"):
        run(register(trainer_dir, "DIM_IS_NOT_HERE"))


# ---------------------------------------------------------------- what a trainer returns
@pytest.mark.parametrize(("cls", "reason"), [
    ("NanTrainer", "tensor '0.bias' has 1 NaN/Inf value(s)"),
    ("WrongShapeTrainer", "tensor '0.weight' is float32[1, 3], expected float32[1, 25]"),
    ("WrongDtypeTrainer", "tensor '0.bias' is float64[1], expected float32[1]"),
    ("RenamingTrainer", "missing tensor(s) ['0.bias', '0.weight']; unexpected tensor(s) ['model.0.bias', "
                        "'model.0.weight']"),
])
def test_parameters_that_do_not_fit_the_model_are_refused(trainer_dir: Path, cls: str, reason: str) -> None:
    spec = job()
    model = global_model(spec)
    before = get_weights(model)
    x, y = data()
    with pytest.raises(TrainerRefusedError) as exc:
        train_registered(model, {"fedml-sgd": register(trainer_dir, cls)}, spec, x, y, seed=1, round_idx=1)
    assert reason in str(exc.value) and "do not fit the job's model 'logreg'" in str(exc.value)
    # The daemon's model is untouched: nothing of a refused trainer's output can be released.
    assert all(np.array_equal(get_weights(model)[k], before[k]) for k in before)


def test_check_params_lists_every_problem() -> None:
    expected = get_weights(build_model("mlp", 4, [3]))
    got = {k: v.copy() for k, v in expected.items()}
    got["0.weight"] = got["0.weight"].astype(np.float16)
    got["2.bias"] = np.array([np.inf], np.float32)
    del got["0.bias"]
    got["extra"] = np.zeros(1, np.float32)
    problems = check_params(got, ["'x' is a str, not a tensor"], expected)
    assert problems == [
        "'x' is a str, not a tensor", "missing tensor(s) ['0.bias']", "unexpected tensor(s) ['extra']",
        "tensor '0.weight' is float16[3, 4], expected float32[3, 4]", "tensor '2.bias' has 1 NaN/Inf value(s)",
    ]
    assert check_params(expected, [], expected) == []


# ---------------------------------------------------------------- clipping bounds any trainer
def test_a_huge_update_is_still_clipped_and_noised(trainer_dir: Path, tmp_path: Path) -> None:
    spec = job(privacy={"clip_norm": 0.5, "noise_multiplier": 0.4, "delta": 1e-5})
    model, before, _ = run(register(trainer_dir, "HugeTrainer"), spec)
    after = get_weights(model)
    delta = {k: after[k] - before[k] for k in before}
    raw = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
    assert raw > 1e6  # the trainer's update is enormous
    engine = PrivacyEngine(AgentState(tmp_path / "agent.db"))
    plan = SitePrivacy(("site",), None, spec.privacy.noise_multiplier, spec.privacy.clip_norm, spec.privacy.delta)
    update = engine.privatize("cleveland", "job-1", 1, spec, plan, delta, 120, None, 0.5,
                              budget=BudgetPolicy(epsilon=1e6))
    sent = decode(update.payload)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))
    d = sum(v.size for v in sent.values())
    c, sigma = spec.privacy.clip_norm, spec.privacy.noise_multiplier
    # ‖clip(Δ) + z‖ ≤ C + ‖z‖, and ‖z‖ ≤ σC(√d + 6) except with probability below e^-18.
    assert norm <= c + sigma * c * (math.sqrt(d) + 6)


# ---------------------------------------------------------------- the site policy's refusals
@pytest.fixture
def policy(trainer_dir: Path) -> SitePolicy:
    p = SitePolicy.load(ROOT / "policies" / "examples" / "cleveland.yaml")
    egress = p.egress.model_copy(update={"allowed_endpoints": ["agg:443"]})
    return p.model_copy(update={"egress": egress, "trainers": {"fedml-sgd": register(trainer_dir)}})


def fake_load(ds: DatasetPolicy, spec: JobSpec) -> SiteData:
    x, y = data(300)
    return SiteData(x[:200], y[:200], x[200:], y[200:])


def reasons(policy: SitePolicy, spec: JobSpec) -> list[str]:
    decision, _ = evaluate(policy, spec, "cleveland", endpoints=["agg:443"], spent={}, active_jobs=0,
                           load=fake_load)
    return decision.reasons


def test_policy_accepts_a_job_naming_a_registered_trainer(policy: SitePolicy) -> None:
    assert reasons(policy, job()) == []
    assert reasons(policy, job(trainer=None)) == []


def test_policy_refuses_an_unregistered_trainer(policy: SitePolicy) -> None:
    assert reasons(policy, job(trainer="someone-elses")) == [
        "trainer 'someone-elses' is not registered in this site's policy (registered: fedml-sgd)"]
    bare = policy.model_copy(update={"trainers": {}})
    assert reasons(bare, job()) == ["trainer 'fedml-sgd' is not registered in this site's policy (registered: none)"]


def test_policy_refuses_record_level_dp_model_and_dataset_outside_the_registration(
        policy: SitePolicy, trainer_dir: Path) -> None:
    record = job(privacy={"clip_norm": 1.0, "noise_multiplier": 0.5, "unit": "record", "record_clip_norm": 1.0,
                          "record_noise_multiplier": 1.0}, rounds=2)
    assert [r for r in reasons(policy, record) if "trainer" in r] == [
        "trainer 'fedml-sgd' cannot give record-level DP (privacy.unit: record): that guarantee needs fedsilo's "
        "DP-SGD training loop"]
    narrow = register(trainer_dir).model_copy(update={"models": ["mlp"], "datasets": ["other"]})
    assert reasons(policy.model_copy(update={"trainers": {"fedml-sgd": narrow}}), job()) == [
        "trainer 'fedml-sgd' is registered for models mlp, not 'logreg'",
        "trainer 'fedml-sgd' is registered for datasets other, not 'heart-disease'",
    ]


def test_registration_validates_its_fields(trainer_dir: Path) -> None:
    base = register(trainer_dir).model_dump(mode="json")
    bad: dict[str, Any]
    for bad in ({"import_path": "hospital_trainers.SgdTrainer"}, {"source_sha256": "abc"},
                {"search_path": "relative/dir"}, {"models": []}):
        with pytest.raises(ValueError):
            TrainerRegistration.model_validate({**base, **bad})
    # A policy with a trainers section loads from YAML, registration intact.
    policy = yaml.safe_load((ROOT / "policies" / "examples" / "cleveland.yaml").read_text())
    policy["trainers"] = {"sgd": base}
    path = trainer_dir.parent / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    assert SitePolicy.load(path).trainers == {"sgd": register(trainer_dir)}


"""Aggregation strategies: FedAvg as an exact running sum with O(model) state; the robust strategies bound what
one poisoned site (scaled, sign-flipped, or claiming a huge sample count) can do to the aggregate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator.strategies import CoordinateMedian, FedAvg, NormBoundedFedAvg, TrimmedMean, make_strategy
from federation.jobs import JobSpec
from tests.unit.test_jobs import example as valid_job


def _w(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((3,), value, dtype=np.float32), "b": np.full((2, 2), -value, dtype=np.float32)}


def test_weighted_average_is_exact() -> None:
    s = FedAvg()
    s.reset(_w(0))
    s.add(_w(1.0), 10)
    s.add(_w(4.0), 30)
    out = s.apply(_w(100.0))
    expected = 100.0 + (10 * 1.0 + 30 * 4.0) / 40
    np.testing.assert_allclose(out["a"], expected, rtol=1e-7)
    np.testing.assert_allclose(out["b"], -expected, rtol=1e-7)
    assert out["a"].dtype == np.float32
    assert s.count == 2


def test_order_does_not_matter_and_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    ups = [({"w": rng.normal(size=(50,)).astype(np.float32)}, int(rng.integers(1, 500))) for _ in range(20)]
    results = []
    for order in (ups, ups[::-1]):
        s = FedAvg()
        s.reset({"w": np.zeros(50, dtype=np.float32)})
        for u, n in order:
            s.add(u, n)
        results.append(s.apply({"w": np.zeros(50, dtype=np.float32)})["w"])
    ref = sum(n * u["w"].astype(np.float64) for u, n in ups) / sum(n for _, n in ups)
    np.testing.assert_allclose(results[0], ref, rtol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])


def test_state_does_not_grow_with_sites() -> None:
    s = FedAvg()
    s.reset(_w(0))
    for _ in range(1000):
        s.add(_w(1.0), 1)
    assert sum(v.nbytes for v in s._sum.values()) == sum(v.nbytes for v in _w(0).values()) * 2  # float64


def test_server_learning_rate_scales_the_step_and_reset_clears() -> None:
    s = make_strategy(JobSpec.model_validate({**valid_job(), "server_learning_rate": 0.5}))
    s.reset(_w(0))
    s.add(_w(2.0), 5)
    np.testing.assert_allclose(s.apply(_w(0))["a"], 1.0)
    s.reset(_w(0))
    with pytest.raises(ValueError, match="no update"):
        s.apply(_w(0))


HONEST = [(1.0, 100), (1.2, 120), (0.8, 90), (1.1, 110)]
POISON = (-50.0, 1_000_000)  # sign-flipped, scaled, and claiming ten thousand times the data


def _aggregate(strategy: FedAvg | CoordinateMedian | TrimmedMean | NormBoundedFedAvg,
               ups: list[tuple[float, int]]) -> float:
    strategy.reset(_w(0))
    for value, n in ups:
        strategy.add(_w(value), n)
    return float(strategy.apply(_w(0))["a"][0])


@pytest.mark.parametrize("make", [CoordinateMedian, lambda: TrimmedMean(0.2), lambda: NormBoundedFedAvg(2.0)])
def test_robust_strategies_bound_one_poisoned_site_where_fedavg_follows_it(make: Any) -> None:
    assert _aggregate(FedAvg(), [*HONEST, POISON]) < -49  # one site with a big claimed count decides alone
    robust = _aggregate(make(), [*HONEST, POISON])
    assert 0.3 < robust <= 1.2, robust  # still pointing the honest way, within the honest range


def test_median_and_trimmed_mean_values() -> None:
    ups = [(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1), (100.0, 1)]
    assert _aggregate(CoordinateMedian(), ups) == pytest.approx(3.0)
    assert _aggregate(TrimmedMean(0.2), ups) == pytest.approx(3.0)  # drops 1.0 and 100.0
    assert _aggregate(TrimmedMean(0.0), ups) == pytest.approx(22.0)  # no trimming: the plain mean
    assert _aggregate(TrimmedMean(0.4), [(1.0, 1), (5.0, 1)]) == pytest.approx(3.0)  # never trims everything


def test_norm_bounded_fedavg_clips_and_caps_weights() -> None:
    # _w(v) has norm |v|·√7; bound 1 clips every update to norm 1, i.e. value ±1/√7.
    out = _aggregate(NormBoundedFedAvg(1.0), [(10.0, 10), (10.0, 10), (-10.0, 10_000)])
    assert out == pytest.approx((1 / np.sqrt(7)) / 3)  # the inflated count is capped at the median (10)
    # Under the bound nothing is clipped; counts are capped at their median (20): (1·10 + 3·20) / 30.
    assert _aggregate(NormBoundedFedAvg(100.0), [(1.0, 10), (3.0, 30)]) == pytest.approx(7 / 3)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "median", "trimmed_mean", "fedavg_normbound"])
def test_every_strategy_a_job_can_name_is_built_and_refuses_an_empty_round(name: str) -> None:
    site_level = {"unit": "site", "clip_norm": 0.3, "noise_multiplier": 0.4}  # fedprox needs plain local training
    s = make_strategy(JobSpec.model_validate({**valid_job(), "aggregation": name, "privacy": site_level}))
    s.reset(_w(0))
    with pytest.raises(ValueError, match="no update"):
        s.apply(_w(0))
    s.add(_w(1.0), 5)
    assert s.count == 1
    clip = site_level["clip_norm"]  # norm-bounded FedAvg clips to it by default
    np.testing.assert_allclose(s.apply(_w(0))["a"], 1.0 if name != "fedavg_normbound" else clip / np.sqrt(7), rtol=1e-6)


def test_unknown_strategy_is_refused_in_the_job() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        JobSpec.model_validate({**valid_job(), "aggregation": "krum"})


def test_fedprox_proximal_term_keeps_local_training_near_the_global_model() -> None:

    from agent.trainer import train_local
    from federation.jobs import Hyperparameters
    from federation.models import build_model, get_weights

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    hp = Hyperparameters(epochs=5, learning_rate=0.5, batch_size=32)

    def drift(mu: float) -> float:
        model = build_model("logreg", 5, seed=1)
        start = get_weights(model)
        train_local(model, x, y, hp, seed=3, proximal_mu=mu)
        end = get_weights(model)
        return float(np.sqrt(sum(np.sum((end[k] - start[k]) ** 2) for k in start)))

    assert drift(1.0) < 0.5 * drift(0.0)


def test_fedprox_with_record_level_dp_is_refused() -> None:
    job = valid_job()
    job["aggregation"] = "fedprox"
    assert job["privacy"]["unit"] == "record"  # the example job is record-level
    with pytest.raises(ValueError, match="fedprox is not available with record-level DP"):
        JobSpec.model_validate(job)

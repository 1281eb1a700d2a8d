"""FedAvg as a running sum: exact sample-weighted mean, O(model) state, order-independent."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategies import FedAvg, make_strategy


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
    s = make_strategy("fedavg", 0.5)
    s.reset(_w(0))
    s.add(_w(2.0), 5)
    np.testing.assert_allclose(s.apply(_w(0))["a"], 1.0)
    s.reset(_w(0))
    with pytest.raises(ValueError, match="no update"):
        s.apply(_w(0))

"""The runahead/tsp projection model: fits recover known parameters, the simulation matches
hand-worked pipelines."""
import numpy as np
import pytest

from edgeprefill.projection import (
    LayerCost,
    Link,
    best_runahead,
    cost_balanced_sizes,
    fit_layer_cost,
    full_time,
    mix_sizes,
    runahead_time,
    tsp_time,
)


def test_fit_layer_cost_recovers_known_coefficients():
    true = LayerCost(2e-4, 3e-6, 5e-10)
    samples = [(c, s, true(c, s)) for c in (64, 256, 1024, 4096) for s in (0, 2048, 8192)]
    got = fit_layer_cost(samples)
    assert got.t0 == pytest.approx(true.t0, rel=1e-6)
    assert got.a == pytest.approx(true.a, rel=1e-6)
    assert got.b == pytest.approx(true.b, rel=1e-6)
    assert got.rms_rel < 1e-9
    with pytest.raises(ValueError, match="at least 3"):
        fit_layer_cost(samples[:2])


def test_link_fit_recovers_latency_and_bandwidth():
    link = Link(30e-6, 20e9)
    trips = [{"bytes": b, "round_trip_s": 2 * link.time(b)} for b in (1 << 10, 1 << 20, 1 << 26)]
    got = Link.fit(trips)
    assert got.latency_s == pytest.approx(30e-6, rel=1e-3)
    assert got.bytes_per_s == pytest.approx(20e9, rel=1e-3)
    assert Link.gbit(10, 50).bytes_per_s == 1.25e9 and link.time(0) == 0.0


def test_runahead_simulation_is_a_pipeline():
    flat = LayerCost(1.0, 0.0, 0.0)  # every chunk costs 1 s a layer
    free = Link(0.0, float("inf"))
    # p ranks, L layers, no link cost: the wavefront takes L + p - 1 steps
    for p, L in ((1, 4), (2, 4), (3, 5)):
        assert runahead_time(flat, free, [10] * p, L, 8) == pytest.approx(L + p - 1)
    # a link of 0.5 s per message on 2 ranks: each layer's hand-off also holds the sender
    slow = Link(0.5, float("inf"))
    assert runahead_time(flat, slow, [10, 10], 2, 8) == pytest.approx(1 + 0.5 + 1 + 0.5 + 1)
    # one rank is plain single-chunk prefill
    cost = LayerCost(1e-4, 1e-6, 1e-9)
    assert runahead_time(cost, free, [1000], 7, 8) == pytest.approx(full_time(cost, 1000, 7, 1000))


def test_tsp_pays_a_gather_per_layer_and_runahead_wins_on_slow_links():
    cost = LayerCost(1e-4, 2e-6, 2e-9)
    fast, slow = Link(1e-6, 1e12), Link.gbit(10)
    n, L, kvb = 8192, 32, 4096
    assert tsp_time(cost, slow, n, 4, L, kvb) > tsp_time(cost, fast, n, 4, L, kvb)
    sizes, t = best_runahead(cost, slow, n, 2, L, kvb)
    assert sum(sizes) == n and t < tsp_time(cost, slow, n, 2, L, kvb)
    assert t < full_time(cost, n, L, n)


def test_cost_balanced_partition_equalises_compute():
    cost = LayerCost(0.0, 1e-6, 1e-9)
    sizes = cost_balanced_sizes(cost, 8000, 4)
    assert sum(sizes) == 8000 and sizes == sorted(sizes, reverse=True)
    starts = np.cumsum([0] + sizes[:-1])
    times = [cost(c, s) for c, s in zip(sizes, starts)]
    assert max(times) / min(times) < 1.01
    assert mix_sizes([4, 4], [6, 2], 0.5, 8) == [5, 3] and mix_sizes([4, 4], [6], 1, 8) == [4, 4]

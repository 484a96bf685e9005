"""sim/engine_time.py and sim/events.py: the engine-time model and the event queue that
``simulate`` and ``simulate_cluster`` share."""

from __future__ import annotations

import numpy as np
import pytest

import sim.cluster
import sim.simulator
from server.scheduling import LatencyModel, TierInfo
from sim.engine_time import EngineTime, full_capacity, profiled_ms, scale_tiers
from sim.events import Events

TIERS = [
    TierInfo("w100", 1.0, {1: 4.0, 4: 8.0, 8: 13.0}),
    TierInfo("w050", 0.5, {1: 2.0, 4: 3.0, 8: 4.0}),
]
P50 = {"w100": {1: 3.0, 4: 6.0, 8: 10.0}, "w050": {"1": 2.0, "4": 3.0, "8": 5.0}}


def test_lookup_interpolates_between_profiled_batch_sizes():
    """Linear between measured sizes, as the scheduler's latency model: a batch of 2 costs
    a third of the way from 1 row to 4, not the profiled 4 (it used to be rounded up)."""
    assert profiled_ms(P50["w100"], 1) == 3.0
    assert profiled_ms(P50["w100"], 2) == pytest.approx(4.0)
    assert profiled_ms(P50["w050"], 5) == pytest.approx(3.5)  # string keys, as from JSON
    assert profiled_ms({4: 2.0, 8: 4.0}, 1) == 2.0  # below the smallest size: its value
    with pytest.raises(ValueError, match="batch 9"):
        profiled_ms(P50["w100"], 9)


def test_the_engine_draws_from_the_distribution_the_scheduler_plans_with():
    """Same interpolation, same sigma: the simulated engine's quantiles are the latency
    model's (before online correction), at profiled and in-between batch sizes."""
    tiers = [
        TierInfo(t.name, t.accuracy, t.latency_ms, {int(b): v for b, v in P50[t.name].items()})
        for t in TIERS
    ]
    model = LatencyModel(tiers, slo_target=0.9)
    engine = EngineTime(tiers, P50, np.random.default_rng(1))
    for rows in (2, 6):
        assert engine.typical_s("w100", rows) == pytest.approx(model.median("w100", rows))
        assert engine.sigma("w100", rows) == pytest.approx(model.sigma("w100", rows))
        draws = np.array([engine.draw_s("w100", rows) for _ in range(20_000)])
        assert np.quantile(draws, 0.9) == pytest.approx(model.estimate("w100", rows), rel=0.02)


def test_sigma_puts_the_profiled_p90_at_the_90th_percentile():
    engine = EngineTime(TIERS, P50, np.random.default_rng(0))
    draws = np.array([engine.draw_s("w100", 8) for _ in range(20_000)])
    assert np.quantile(draws, 0.5) == pytest.approx(0.010, rel=0.02)
    assert np.quantile(draws, 0.9) == pytest.approx(0.013, rel=0.02)
    # A p90 at or below the p50 means no spread at all.
    assert engine.sigma("w050", 8) == 0.0 and engine.draw_s("w050", 8) == 0.005


def test_fixed_noise_replaces_the_profiled_spread():
    engine = EngineTime(TIERS, P50, np.random.default_rng(0), noise=0.0)
    assert engine.sigma("w100", 8) == 0.0 and engine.draw_s("w100", 8) == 0.010


def test_full_capacity_is_the_most_accurate_tier_at_max_batch():
    assert full_capacity(TIERS, P50, max_batch=8, slots=2) == pytest.approx(1600.0)
    # On one core shared with handling: 8 rows per batch time (10 ms) + 8 x 1 ms per request
    # + 2 ms per batch (--host-ms, --host-batch-ms).
    assert full_capacity(TIERS, P50, 8, 1, host_s=0.001) == pytest.approx(8 / 0.018)
    got = full_capacity(TIERS, P50, 8, 1, host_s=0.001, batch_host_s=0.002)
    assert got == pytest.approx(8 / 0.020)


def test_scaled_tiers_are_k_times_slower():
    tiers, p50 = scale_tiers(TIERS, P50, 10.0)
    assert tiers[0].latency_ms[8] == 130.0 and p50["w050"]["8"] == 50.0
    assert full_capacity(tiers, p50, 8, 1) == pytest.approx(full_capacity(TIERS, P50, 8, 1) / 10)


def test_events_come_in_time_order_ties_in_push_order():
    events = Events()
    for t, item in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b")]:
        events.push(t, item)
    assert [events.pop() for _ in range(len(events))] == [
        (1.0, "a"),
        (1.0, "b"),
        (2.0, "c"),
        (2.0, "d"),
    ]
    assert events.next_time() == float("inf") and not events


def test_public_names_stay_where_callers_import_them():
    """The CLI, bench/ and the tests import these from sim.simulator and sim.cluster."""
    single = "simulate SimConfig SimResult make_trace full_capacity format_summary plot_timeline "
    single += "tiers_from_model_dir summarise TRACES read_trace varying_multiplier"
    cluster = "simulate_cluster ClusterConfig ClusterResult HPAConfig HPA ScalingPolicy "
    cluster += "DiurnalTrace load_at make_cluster_trace scale_tiers format_totals Replica "
    cluster += "Balancer AUTOSCALERS BALANCERS CLUSTER_TRACES"
    for module, names in ((sim.simulator, single), (sim.cluster, cluster)):
        missing = [n for n in names.split() if not hasattr(module, n)]
        assert not missing, f"{module.__name__} lacks {missing}"

"""Review of the simulators (session 27): each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from server.scheduling import TierInfo
from sim.cluster import HPA, ClusterConfig, HPAConfig, make_cluster_trace, simulate_cluster
from sim.cluster_bins import bin_edges

P50 = {
    "w100": {1: 7.0, 2: 13.2, 4: 30.0, 8: 49.4},
    "w025": {1: 0.85, 2: 1.8, 4: 3.4, 8: 6.5},
}
ACC = {"w100": 1.0, "w025": 0.075}
TIERS = [TierInfo(n, ACC[n], {b: v * 1.1 for b, v in P50[n].items()}, P50[n]) for n in P50]
K = 20.0


def run(**kw):
    return simulate_cluster(TIERS, P50, ClusterConfig(time_scale=K, trace="steps", **kw))


def test_the_last_bin_ends_at_the_duration():
    # 80 s in 30 s bins: the last edge was 90, so the last bin's offered load and replica
    # counts were divided by 30 s of which only 20 ran (2 static replicas read 1.33).
    assert bin_edges(80.0, 30.0).tolist() == [0.0, 30.0, 60.0, 80.0]
    assert bin_edges(70.0, 30.0).tolist() == [0.0, 30.0, 60.0, 70.0]
    assert bin_edges(60.0, 30.0).tolist() == [0.0, 30.0, 60.0]
    assert bin_edges(10.0, 30.0).tolist() == [0.0, 10.0]
    r = run(autoscaler="static", duration_s=80.0, bin_s=30.0)
    assert r.bins["t_s"] == [0.0, 30.0, 60.0]
    assert r.bins["replicas_cost"] == pytest.approx([2.0, 2.0, 2.0])
    assert r.bins["replicas_ready"] == pytest.approx([2.0, 2.0, 2.0])
    # The offered load of the last bin is its arrivals over the 20 s it covers.
    last = ((r.arrivals >= 60.0) & (r.arrivals < 80.0)).sum()
    assert r.bins["offered_per_s"][-1] == pytest.approx(last / 20.0)


def test_a_step_shorter_than_the_rate_grid_offers_its_load():
    # Thinning took its top rate from a 0.25 s grid: a 0.1 s step at 5x between two grid
    # points was thinned at 1x's rate and offered a fifth of what load_at says.
    steps = ((0.0, 1.0), (10.1, 5.0), (10.2, 1.0))
    counts = [
        ((t >= 10.1) & (t < 10.2)).sum()
        for t in (
            make_cluster_trace(
                ClusterConfig(trace="steps", steps=steps, duration_s=20.0, seed=s), 1000.0
            )
            for s in range(20)
        )
    ]
    assert np.mean(counts) == pytest.approx(500.0, rel=0.1)  # 5 x 1000/s x 0.1 s


def test_no_evaluation_after_a_trace_shorter_than_one_period():
    # A 10 s run evaluated at 15 s anyway and started 4 pods after the trace had ended.
    r = run(steps=((0.0, 3.0),), duration_s=10.0)
    assert r.ticks == []
    assert r.totals["replicas_started"] == 2 and r.totals["scale_ups"] == 0


def test_initial_replicas_zero_is_refused_not_read_as_the_minimum():
    # ``initial_replicas or min_replicas`` started 2 pods for 0.
    with pytest.raises(ValueError, match=r"ClusterConfig.initial_replicas must be >= 1"):
        ClusterConfig(initial_replicas=0)
    assert ClusterConfig(initial_replicas=1).initial_replicas == 1


def test_a_count_outside_min_max_goes_to_the_bound_at_once():
    # The controller (reconcileAutoscaler) sets a count below minReplicas to the minimum
    # and one above maxReplicas to the maximum before it reads a metric - no rate policy,
    # no stabilisation. The model applied the policies: 1 -> 5 (k8s: 2), 12 -> 9 (k8s: 10).
    cfg = HPAConfig(min_replicas=2, max_replicas=10)
    h = HPA(cfg)
    assert h.step(15.0, 1, 20) == 2
    assert h.step(30.0, 2, 20) == 6  # then the policies: max(+100 %, +4 pods)
    h = HPA(cfg)
    assert h.step(15.0, 12, 2) == 10
    assert h.recommendations == []  # no recommendation kept for the stabilisation window
    # The 2 pods removed at 15 s count in the scale-down policies' period: from 12, 20 %.
    assert h.step(30.0, 10, 2) == 9
    assert HPA(cfg).step(15.0, 0, 5) == 0  # scaled to zero by hand: autoscaling is off
    # Through the cluster: a run that starts below the minimum, overloaded.
    r = run(steps=((0.0, 6.0),), duration_s=30.0, initial_replicas=1)
    assert r.ticks[0]["replicas"] == 1 and r.ticks[0]["desired_raw"] > 2
    assert r.ticks[0]["desired"] == 2


def test_the_shared_core_model_runs_with_no_requests():
    # An empty open-loop trace or a closed loop of 0 requests raised TypeError in the
    # summary (an empty list of states became a float array, and & on floats fails).
    from sim.shared_core import HostCost, simulate_shared

    host = HostCost(parse_s=0.0005, answer_s=0.0003)
    for kw in ({"arrivals": np.zeros(0)}, {"clients": 2, "n_requests": 0}):
        s = simulate_shared(TIERS, P50, host, budgets_s=lambda i: 0.05, **kw).summary
        assert s["sent"] == 0 and s["slo_attainment"] == 1.0 and s["refused"] == {}
        assert s["p50_latency_ms"] is None and s["goodput_per_s"] == 0.0


def test_a_fixed_policy_is_not_degraded_load():
    # The server counts a request as degraded below its nominal tier - a fixed policy's own
    # (ModelRuntime.nominal_tier): an operator's choice is not load. The cluster compared
    # with the top tier, so fixed:w025 at 0.3 of a replica's load read a degraded share of
    # 1.0 and the HPA scaled to max_replicas.
    r = run(policy="fixed:w025", steps=((0.0, 0.3),), duration_s=60.0)
    assert r.totals["tier_mix"]["w025"] == 1.0 and r.totals["refused"] == 0
    assert all(t["degraded_share"] == 0.0 for t in r.ticks)
    assert all(t["desired"] == 2 for t in r.ticks)
    # The innfer policy still counts what it serves below the top tier.
    r = run(steps=((0.0, 4.0),), duration_s=30.0)
    assert r.ticks[0]["degraded_share"] > 0.2

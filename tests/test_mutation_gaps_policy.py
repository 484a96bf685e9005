"""The tier an idle replica serves a budget at (``best_in_budget``), which the degraded
share - innfer_degraded_requests_total, innfer:degraded_share and the HPA - reads (review
helper-304, mutation S08: its fallback was the most accurate tier instead of the fastest).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime.engines.fake import write_model
from runtime.repository import Repository
from server.metrics import Metrics
from server.model_runtime import ModelRuntime
from server.scheduling import TierInfo, best_in_budget
from server.scheduling.device import Device
from server.scheduling.latency import LatencyModel

TIERS = [
    TierInfo("w100", 0.99, {1: 40.0, 4: 40.0}),
    TierInfo("w075", 0.98, {1: 20.0, 4: 20.0}),
    TierInfo("w050", 0.97, {1: 10.0, 4: 10.0}),
]
RANKED = ["w100", "w075", "w050"]  # most accurate first


@pytest.mark.parametrize(
    ("budget_ms", "tier"),
    [(100.0, "w100"), (30.0, "w075"), (15.0, "w050"),
     (5.0, "w050"), (0.001, "w050")],  # below every tier: the fastest, not the best
)  # fmt: skip
def test_best_in_budget_is_the_best_tier_that_fits_else_the_fastest(budget_ms, tier):
    assert best_in_budget(RANKED, LatencyModel(TIERS), 1, budget_ms / 1e3) == tier


def test_a_budget_no_tier_meets_alone_served_at_the_fastest_is_not_degraded(tmp_path):
    # The degraded count judges a budget by the tiers' times as the load's timing left them
    # (review 192). A budget that even the fastest tier misses alone by that timing, served
    # at the fastest, lost its accuracy to its own budget, not to load: more replicas would
    # not serve it better. With the best tier as the fallback it was counted degraded, and
    # the HPA scaled out for it (the review-159 issue back).
    write_model(tmp_path, "m", {"w100": 1.0, "w050": 0.5},
                {"w100": {1: 50.0, 4: 50.0}, "w050": {1: 10.0, 4: 10.0}}, max_batch=4)  # fmt: skip
    served = Repository(tmp_path).load("m", backend="fake")
    metrics = Metrics()

    async def body():
        rt = ModelRuntime(served, metrics, device=Device(1))
        rt.start()
        try:
            rt.warm_up()  # the timing at load: w100 50 ms, w050 10 ms (the fake engines' sleep)
            lane = next(iter(rt.lanes.values()))
            for _ in range(50):  # w050 runs in 2 ms since: a 6 ms budget is admitted at it
                lane.latency.observe("w050", 1, 0.002)
            x = {"input": np.ones((1, 4), np.float32)}
            return (await rt.infer(x, 1, 0.006)).tier
        finally:
            await rt.stop()

    assert asyncio.run(asyncio.wait_for(body(), 30)) == "w050"
    labels = {"model": "m"}
    registry = metrics.registry
    assert (
        registry.get_sample_value(
            "innfer_requests_total", {**labels, "tier": "w050", "outcome": "served"}
        )
        == 1
    )
    assert (registry.get_sample_value("innfer_degraded_requests_total", labels) or 0.0) == 0.0

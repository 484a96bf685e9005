"""Outside load on a GPU as a scheduler input: LatencyModel.set_external (pure), the NVML
reader (server/gpu_load.py) and the data plane's wiring from one to the other.

No GPU and no NVML here: the reader and the wiring run against ``FakeNvml``, a stand-in for
the ``pynvml`` module injected through ``sys.modules``, scripted with utilisations. What a
real driver reports (and how it lags) is untested on this machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.scheduling import LatencyModel, TierInfo
from server.scheduling.latency import EXTERNAL_MAX

MS = 1e-3


def model() -> LatencyModel:
    """Two tiers with a measured spread (p50 / p90 / p99), so quantiles are not the median."""
    return LatencyModel(
        [
            TierInfo("w100", 1.0, {1: 2.4, 8: 11.0}, {1: 2.0, 8: 9.0}, {1: 3.0, 8: 14.0}),
            TierInfo("w050", 0.97, {1: 1.3, 8: 5.5}, {1: 1.0, 8: 4.5}),
        ]
    )


def plans(lat: LatencyModel) -> dict:
    """Every number a plan reads: median, quantile, mean, variance per tier and rows, and
    the compiled tables."""
    out = {}
    for tier in lat.tiers:
        for rows in range(1, 9):
            out[tier, rows] = (
                lat.median(tier, rows),
                lat.estimate(tier, rows),
                lat.quantile(tier, rows, 0.9),
                lat.mean(tier, rows),
                lat.var(tier, rows),
            )
    q, mean, var = lat.tables(["w100", "w050"])
    out["tables"] = (q.copy(), mean.copy(), var.copy())
    return out


def same(a: dict, b: dict) -> bool:
    return all(
        np.array_equal(a[k][i], b[k][i]) if k == "tables" else a[k] == b[k]
        for k in a
        for i in range(len(a[k]))
    )


def test_outside_load_moves_plans_at_once_and_batches_learn_only_the_residual():
    """The scripted sequence: external 1 -> today's numbers exactly; 2 -> median and
    quantile double before any batch; batches at 2x the profile under it leave the learned
    factor ~1; back to 1 -> plans back at once (to the learned level's numbers)."""
    today, lat = model(), model()
    lat.tables(["w100", "w050"])  # handed out before the changes: kept current in place
    v0 = lat.version
    assert lat.set_external(1.0) is False and lat.version == v0
    assert same(plans(lat), plans(today))  # bit for bit, tables included

    assert lat.set_external(2.0) is True and lat.version == v0 + 1
    base = plans(today)
    now = plans(lat)
    for key in base:
        if key == "tables":
            continue
        median, estimate, q90, mean, var = now[key]
        assert median == pytest.approx(2 * base[key][0])
        assert estimate == pytest.approx(2 * base[key][1])
        assert q90 == pytest.approx(2 * base[key][2])
        assert mean == pytest.approx(2 * base[key][3])
        assert var == pytest.approx(4 * base[key][4])
    np.testing.assert_allclose(now["tables"][0][:, 1:9], 2 * base["tables"][0][:, 1:9])

    # Batches that run 2x the profile while the outside load says 2: nothing left to learn.
    for k in range(40):
        rows = 1 + k % 8
        lat.observe("w100", rows, 2 * lat.typical("w100", rows))
        today.observe("w100", rows, lat.typical("w100", rows))  # the same, unloaded
    assert lat.factor["w100"] == pytest.approx(1.0, abs=1e-9)
    assert lat.tier_estimate("w100").factor == pytest.approx(1.0, abs=1e-9)
    assert lat.estimate("w100", 4) == pytest.approx(2 * today.estimate("w100", 4))

    # The load goes away: the plans drop at once, to what an unloaded server learned.
    assert lat.set_external(1.0) is True
    assert lat.external == 1.0
    assert same(plans(lat), plans(today))


def test_small_changes_are_ignored_and_the_factor_is_clamped():
    lat = model()
    lat.set_external(2.0)
    v = lat.version
    before = lat.estimate("w050", 8)
    assert lat.set_external(2.03) is False  # 1.5 %: sample noise, no refresh
    assert lat.version == v and lat.estimate("w050", 8) == before and lat.external == 2.0
    assert lat.set_external(2.1) is True and lat.external == 2.1
    # Drift in steps under 2 % still lands: each is compared with the factor in force.
    assert lat.set_external(2.13) is False and lat.set_external(2.16) is True
    assert lat.external == 2.16
    assert lat.set_external(0.5) is True and lat.external == 1.0  # < 1: no outside load
    lat.set_external(1e6)
    assert lat.external == EXTERNAL_MAX
    lat.set_external(1.015)  # within the step of 1: exactly 1, not 1.5 % above today
    assert lat.external == 1.0
    with pytest.raises(ValueError, match="finite"):
        lat.set_external(math.nan)


def test_a_change_of_outside_load_the_batches_saw_first_is_absorbed_by_the_level():
    """Batches show the load before NVML does (the reader samples every 0.5 s): the level
    learns it; once the external factor arrives the level goes back to ~1 within a few
    batches - the overlap double-counts only for those."""
    lat = model()
    for _ in range(20):
        lat.observe("w050", 1, 3 * lat.typical("w050", 1))
    assert lat.factor["w050"] == pytest.approx(3.0, rel=0.01)
    lat.set_external(3.0)
    for _ in range(20):
        lat.observe("w050", 1, 3 * lat.typical("w050", 1))
    assert lat.factor["w050"] == pytest.approx(1.0, rel=0.01)
    assert lat.median("w050", 1) == pytest.approx(3 * lat.typical("w050", 1), rel=0.01)

"""bench/rest.py's reporting, on synthetic runs (no servers): medians and spreads over
repeats, and innfer's ratios to the best peer per point."""

from __future__ import annotations

import pytest

from bench import rest


def _run(tp: float, p50: float, errors: int = 0) -> dict:
    return {"throughput_per_s": tp, "p50_ms": p50, "p99_ms": 2 * p50, "sent": 100,
            "errors": {"boom": errors} if errors else {}}  # fmt: skip


def test_summaries_are_medians_with_their_range_and_error_totals():
    s = rest.summarise([_run(100, 2.0), _run(300, 1.0, errors=2), _run(200, 3.0)])
    assert s["throughput_per_s"] == 200 and s["throughput_per_s_range"] == [100, 300]
    assert s["p50_ms"] == 2.0 and s["p50_ms_range"] == [1.0, 3.0]
    assert s["errors"] == 2 and s["sent"] == 300 and s["repeats"] == 3


def test_ratios_are_against_the_best_peer_per_point_and_skip_points_innfer_missed():
    summary = {
        "c1-json": {
            "innfer": rest.summarise([_run(400, 2.0)]),
            "kserve": rest.summarise([_run(380, 2.5)]),
            "pytriton": rest.summarise([_run(270, 1.5)]),
        },
        "c8-json": {"kserve": rest.summarise([_run(500, 9.0)])},  # innfer could not serve it
    }
    r = rest.ratios(summary)
    assert set(r) == {"c1-json"}
    assert r["c1-json"]["best_peer"] == "kserve"
    assert r["c1-json"]["throughput_ratio"] == pytest.approx(400 / 380)
    assert r["c1-json"]["lowest_p50_peer"] == "pytriton"
    assert r["c1-json"]["p50_ratio"] == pytest.approx(2.0 / 1.5)

"""Review fixes in bench/ (measurement and reporting), each on synthetic data: no servers,
no benchmark runs."""

from __future__ import annotations

import pytest

from bench import hot_path


def _loadgen_summary(within: int, late: int, refused: int, wall: float, p50: float) -> dict:
    return {"within_budget": within, "late": late, "refused_total": refused,
            "sent": within + late + refused, "wall_seconds": wall,
            "p50_latency_ms": p50}  # fmt: skip


# -- finding 2: hot_path's gRPC throughput counts answers, a round with errors is left out --
def test_hot_path_throughput_counts_answered_requests_not_sent():
    r = hot_path.round_figures(_loadgen_summary(80, 10, 110, 2.0, 1.0))
    assert r["throughput_per_s"] == pytest.approx(90 / 2.0)  # not 200 sent / 2 s
    assert r["answered"] == 90 and r["errors"] == 110 and r["usable"] is False
    assert hot_path.round_figures(_loadgen_summary(100, 0, 0, 2.0, 1.0))["usable"] is True


def test_hot_path_leaves_rounds_with_errors_out_of_the_medians_and_pairs():
    ok = [hot_path.round_figures(_loadgen_summary(100, 0, 0, 1.0, p)) for p in (1.0, 1.2, 1.1)]
    bad = hot_path.round_figures(_loadgen_summary(10, 0, 90, 1.0, 0.2))
    out = hot_path.grpc_summary({"new": [ok[0], bad, ok[1]], "old": ok})
    assert out["new"]["p50_ms"] == pytest.approx(1.1)  # median of 1.0 and 1.2, not 0.2
    assert out["new"]["unusable_rounds"] == 1 and out["new"]["usable_rounds"] == 2
    assert out["new"]["throughput_per_s"] == pytest.approx(100.0)
    pairs = out["paired_p50_diff_ms"]
    assert pairs["each"] == pytest.approx([0.0, 0.1]) and pairs["pairs_left_out"] == 1
    none = hot_path.grpc_summary({"new": [bad]})
    assert none["new"]["p50_ms"] is None and none["new"]["unusable_rounds"] == 1

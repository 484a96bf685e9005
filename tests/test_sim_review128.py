"""The simulator as the server runs (review helper-128): `innfer simulate` planned with the
whole budget where the server takes off budget_margin_ms first (46.5 % w100 predicted, 0 %
served at U(15, 16) ms budgets); unbounded --cv2 / --noise; flags read by nothing; "0.0 ms"
latencies where nothing was served. Each test fails without its fix."""

from __future__ import annotations

import numpy as np
import pytest

from innfer.cli import build_parser
from sim.simulator import SimConfig, format_ms, replay
from sim.tiering import TierInfo

# w100 takes 14.5 ms at batch 1, w050 5 ms: a 15 ms budget fits w100 only without the margin
TIERS = [TierInfo("w100", 1.0, {1: 14.5}), TierInfo("w050", 0.5, {1: 5.0})]
P50 = {"w100": {1: 14.5}, "w050": {1: 5.0}}


def _mix(margin_ms: float) -> dict:
    arrivals = np.arange(20) * 0.1  # one at a time: no queueing
    budgets = np.full(20, 0.015)
    cfg = SimConfig(noise=0.0, duration_s=2.0, budget_margin_ms=margin_ms)
    return replay(TIERS, P50, arrivals, budgets, cfg).summary["tier_mix"]


def test_the_simulated_server_plans_with_its_budget_margin_taken_off():
    assert _mix(0.0).get("w100", 0) == 1.0  # the whole 15 ms: the full tier fits
    assert _mix(1.0).get("w050", 0) == 1.0  # 14 ms planned, as the server plans: it does not


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trace", "gamma", "--cv2", "1e8"], "at most 100"),
        (["--noise", "1e308"], "at most 3"),
    ],
)
def test_trace_and_noise_flags_are_bounded(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "m", *argv])
    assert message in capsys.readouterr().err


def test_flags_nothing_reads_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):  # bench sends to a server: its engine has its own noise
        build_parser().parse_args(["bench", "m", "--noise", "0.3"])
    capsys.readouterr()
    from serverutil import build_repository

    from innfer.cli import main

    build_repository(tmp_path)
    code = main(["simulate", str(tmp_path / "tiny"), "--cv2", "4", "--duration", "1"])
    assert code == 2 and "--cv2 shapes a gamma trace" in capsys.readouterr().err


def test_a_run_that_served_nothing_has_no_latency():
    assert format_ms(None) == "-" and format_ms(3.14159) == "3.1"
    assert format_ms(0.0312) == "0.031"  # a tiny model's latency printed as 0.0


def _two_requests(tmp_path, rows: int = 1):
    path = tmp_path / "two.csv"
    path.write_text(f"arrival_s,budget_ms,rows\n0.0,50,{rows}\n0.05,50,{rows}\n")
    return path


def test_goodput_is_counted_over_the_traces_window(tmp_path, monkeypatch, capsys):
    # 2 requests "over 30 s" reported 373.5/s (bench) and a one-request trace 69.6/s beside
    # an offered 0.0/s (simulate --host-ms): each divided by its own span.
    import json

    from serverutil import build_repository, fake_run_load

    from innfer.cli import main

    build_repository(tmp_path)
    d, trace = tmp_path / "tiny", _two_requests(tmp_path)
    fake_run_load(monkeypatch)  # every request answered 1 ms after it was sent
    out = tmp_path / "b.json"
    assert main(["bench", str(d), "--trace-file", str(trace), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["goodput_per_s"] == pytest.approx(2 / 30)
    assert main(["simulate", str(d), "--trace-file", str(trace), "--host-ms", "0,0",
                 "--policy", "innfer", "--json", str(out)]) == 0  # fmt: skip
    (run,) = json.loads(out.read_text()).values()
    assert run["summary"]["goodput_per_s"] == pytest.approx(2 / 30)
    capsys.readouterr()


def test_bench_refuses_a_trace_of_requests_larger_than_max_batch(tmp_path, capsys):
    from serverutil import build_repository

    from innfer.cli import main

    build_repository(tmp_path)  # tiny: max_batch 4
    trace = _two_requests(tmp_path, rows=5)
    assert main(["bench", str(tmp_path / "tiny"), "--trace-file", str(trace)]) == 2
    assert "5 rows, more than the model's max_batch (4)" in capsys.readouterr().err


def test_a_replay_at_engine_speed_relaxes_unused_tiers_to_that_speed_not_the_profile():
    """replay(speed=2) ran every batch at 2x its profile, but its latency model settled
    nowhere: an idle arrival relaxed the passed-over w100 to its profile's 20 ms, and sparse
    30 ms requests were planned on it and missed (0.27 within budget; review 201)."""
    tiers = [TierInfo("w100", 1.0, {1: 20.0, 8: 20.0}), TierInfo("w050", 0.9, {1: 2.0, 8: 2.0})]
    p50 = {"w100": {1: 20.0, 8: 20.0}, "w050": {1: 2.0, 8: 2.0}}
    arrivals = np.arange(60) * 3.0  # one every 3 s: each arrives on an idle device
    budgets = np.full(60, 0.030)  # w100 takes 40 ms here: only w050 meets them
    r = replay(tiers, p50, arrivals, budgets, SimConfig(noise=0.0), speed=2.0)
    assert r.summary["slo_attainment"] == 1.0

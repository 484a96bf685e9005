"""bench/peers.py's pure parts on a synthetic result: repeats are summarised by their median
and range, the goals compare innfer with the best peer, and the table prints. No servers."""

from __future__ import annotations

import pytest

from bench import peers


def _run(tp: float, p50: float, good: float | None = None, tiers: dict | None = None) -> dict:
    run = {"sent": 100, "answered": 100, "throughput_per_s": tp, "p50_ms": p50,
           "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.5, "goodput_per_s": good, "errors": {},
           "first_error": None}  # fmt: skip
    if tiers:
        run.update(tier_mix=tiers, mean_served_width=1.0)
    return run


def _results() -> dict:
    def servers(innfer, kserve, pytriton) -> dict:  # 3 rotated repeats: enough to judge
        return {"innfer": peers.headline(innfer * 3), "kserve": peers.headline(kserve * 3),
                "pytriton": peers.headline(pytriton * 3)}  # fmt: skip

    mlp = [
        {"id": "c1", "budget_ms": None,
         "servers": servers([_run(600, 1.5)], [_run(400, 2.4)], [_run(300, 3.1)])},
        {"id": "c8", "budget_ms": None,
         "servers": servers([_run(1000, 7.0)], [_run(950, 8.0)], [_run(700, 6.5)])},
    ]  # fmt: skip
    resnet = [
        {"id": "c8-b30", "budget_ms": 30.0,
         "servers": servers([_run(90, 20, 88, {"w100": 0.5, "w075": 0.5})],
                            [_run(55, 140, 0.0)], [{"error": "boom"}])},
    ]  # fmt: skip
    results = {
        "params": {"repeats": 3},
        "setup": {"affinity": {"pinned": True}},
        "floors": {"mlp": {"engine": {"p50_ms": 0.9}, "echo": {"p50_ms": 0.45}}},
        "models": {"mlp": {"model": "mlp", "points": mlp},
                   "resnet": {"model": "resnet18w50", "points": resnet}},
    }  # fmt: skip
    results["overhead"] = peers.overhead(results)
    results["goals"] = peers.goals(results)
    return results


def test_headline_is_the_median_with_a_range_over_repeats():
    h = peers.headline([_run(100, 3.0), _run(120, 2.0), {"error": "x"}, _run(110, 2.5)])
    assert h["throughput_per_s"] == 110 and h["throughput_per_s_range"] == [100, 120]
    assert h["p50_ms"] == 2.5 and h["p50_ms_range"] == [2.0, 3.0]
    assert h["repeats"] == 4 and h["failed_runs"] == 1 and h["sent"] == 300
    assert peers.headline([{"error": "down"}])["error"] == "down"


def test_goals_compare_innfer_with_the_best_peer():
    results = _results()
    goals = {(g["model"], g["point"], g["kind"]): g for g in results["goals"]}
    tp1 = goals["mlp", "c1", "throughput"]
    assert tp1["best_peer"] == "kserve" and tp1["ratio"] == pytest.approx(1.5) and tp1["met"]
    tp8 = goals["mlp", "c8", "throughput"]  # 1000 / 950 < 1.1
    assert tp8["ratio"] == pytest.approx(1000 / 950) and tp8["met"] is False
    p8 = goals["mlp", "c8", "p50"]  # the lowest peer p50 is PyTriton's 6.5 ms
    assert p8["best_peer"] == "pytriton" and p8["met"] is False
    assert goals["mlp", "c1", "p50"]["met"]
    good = goals["resnet", "c8-b30", "goodput"]  # a failed peer is left out
    assert good["best_peer"] == "kserve" and good["innfer"] == 88 and good["met"] is None
    ov = goals["mlp", "c1", "overhead"]
    assert ov["innfer"] == pytest.approx(1.5 - 0.9 - 0.45) and ov["met"]


def test_summary_prints_every_server_and_goal():
    results = _results()
    text = peers.summarise(results)
    assert text.count("NOT met") == 2 and "w075:50%" in text
    assert "error:" in text  # the PyTriton run that failed at c8-b30


def _point(innfer: list[dict], **peer_runs: list[dict]) -> dict:
    servers = {"innfer": peers.headline(innfer)}
    servers.update({p: peers.headline(r) for p, r in peer_runs.items()})
    return {"id": "c8", "budget_ms": None, "servers": servers}


def _goals(pt: dict) -> dict:
    results = {"models": {"mlp": {"model": "mlp", "points": [pt]}}}
    return {g["kind"]: g for g in peers.goals(results)}


def test_a_failed_peer_leaves_the_goals_incomplete_not_met():
    # KServe failed: innfer (900/s) only beats PyTriton (700/s); that is no verdict
    g = _goals(_point([_run(900, 1.0)], kserve=[{"error": "boom"}], pytriton=[_run(700, 2.0)]))
    assert g["throughput"]["met"] is None and g["throughput"]["missing_peers"] == ["kserve"]
    assert g["p50"]["met"] is None and g["p50"]["missing_peers"] == ["kserve"]
    assert g["throughput"]["best_peer"] == "pytriton"  # still reported
    # a peer not run at all is missing too
    g = _goals(_point([_run(900, 1.0)], pytriton=[_run(700, 2.0)]))
    assert g["throughput"]["met"] is None and g["throughput"]["missing_peers"] == ["kserve"]


def test_a_peer_with_fewer_good_repeats_leaves_the_goals_incomplete():
    g = _goals(
        _point(
            [_run(900, 1.0), _run(910, 1.0)],
            kserve=[_run(500, 2.0), {"error": "one repeat failed"}],
            pytriton=[_run(700, 2.0), _run(710, 2.0)],
        )
    )
    assert g["throughput"]["met"] is None and g["throughput"]["missing_peers"] == ["kserve"]
    full = _goals(
        _point(
            [_run(900, 1.0), _run(910, 1.0), _run(905, 1.0)],
            kserve=[_run(500, 2.0), _run(510, 2.0), _run(505, 2.0)],
            pytriton=[_run(700, 2.0), _run(710, 2.0), _run(705, 2.0)],
        )
    )
    assert full["throughput"]["met"] is True and full["throughput"]["missing_peers"] == []
    assert full["p50"]["met"] is True


def test_fewer_repeats_than_servers_judge_nothing():
    # One repeat is one order - innfer first at repeat 0 - and the first arm on this machine
    # runs differently: session 30's single repeat recorded "met" (review helper-130).
    for n in (1, 2):
        g = _goals(_point([_run(900, 1.0)] * n, kserve=[_run(500, 2.0)] * n,
                          pytriton=[_run(700, 2.0)] * n))  # fmt: skip
        assert g["throughput"]["met"] is None and "too few to judge" in g["throughput"]["reason"]


def test_the_summary_says_incomplete_and_names_the_missing_peer():
    results = _results()
    pt = _point([_run(900, 1.0)], kserve=[{"error": "boom"}], pytriton=[_run(700, 2.0)])
    results["models"]["mlp"]["points"].append(pt | {"id": "c1"})
    results["goals"] = peers.goals(results)
    text = peers.summarise(results)
    assert "incomplete" in text and "missing or unequal repeats: kserve" in text


def test_the_engine_floor_runs_on_the_server_cpus_then_the_client_cpus_return(monkeypatch):
    import os

    usable = sorted(os.sched_getaffinity(0))
    server, client = {usable[-1]}, {usable[0]}
    seen = []

    def fake_engine_time(onnx, inputs, n, max_s):
        seen.append(os.sched_getaffinity(0))
        return {"p50_ms": 0.5}

    monkeypatch.setattr(peers, "engine_time", fake_engine_time)
    args = type("Args", (), {"requests": 10, "seconds": 3.0})()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client)  # the load generator, pinned
    try:
        floor = peers.engine_floor({"onnx": None, "inputs": {}}, args, server)
        assert seen == [server] and floor["cpus"] == sorted(server)
        assert os.sched_getaffinity(0) == client  # back on the client's CPUs
        assert peers.engine_floor({"onnx": None, "inputs": {}}, args, None)["cpus"] is None
        assert seen[-1] == client  # not pinned: left where it is
    finally:
        os.sched_setaffinity(0, before)


def test_the_overhead_split_labels_its_last_term_a_residual():
    results = _results()
    c1 = results["models"]["mlp"]["points"][0]["servers"]["innfer"]
    c1["server_mean_ms"] = {"success": 1.0, "compute_infer": 0.95}
    ov = peers.overhead(results)
    split = ov["split_ms"]
    assert "outside_server_over_echo" not in split
    assert split["residual_outside_server"] == pytest.approx(1.5 - 1.0 - 0.45)
    assert "residual" in ov["split_note"] and "median" in ov["split_note"]
    results["overhead"] = ov
    assert "residual outside server" in peers.summarise(results)


def test_the_overhead_pairs_each_repeat_with_its_own_floors():
    # Floors measured once, minutes before the repeats, were subtracted from every repeat's
    # p50 (review helper-130): on a VM whose speed drifts, a fast-hour floor under a
    # slow-hour p50 inflates the overhead. Each repeat now has its floors.
    each = [{"engine": {"p50_ms": 0.6}, "echo": {"p50_ms": 0.4}},
            {"engine": {"p50_ms": 1.0}, "echo": {"p50_ms": 0.5}},
            {"engine": {"p50_ms": 0.8}, "echo": {"p50_ms": 0.45}}]  # fmt: skip
    floors = peers.median_floors(each)
    assert floors["engine"]["p50_ms"] == 0.8 and floors["engine"]["p50_ms_range"] == [0.6, 1.0]
    assert floors["echo"]["p50_ms"] == 0.45 and floors["repeats"] == each
    c1 = peers.headline([_run(900, 1.6), _run(600, 1.7), _run(700, 1.5)])
    points = [{"id": "c1", "servers": {"innfer": c1}}]
    results = {"floors": {"mlp": floors}, "models": {"mlp": {"points": points}}}
    ov = peers.overhead(results)
    assert ov["overhead_ms_each_repeat"] == pytest.approx([0.6, 0.2, 0.25])
    assert ov["overhead_ms"] == pytest.approx(0.25)  # unpaired: 1.6 - 0.8 - 0.45 = 0.35
    del floors["repeats"]  # floors from before the pairing: the unpaired figure
    assert peers.overhead(results)["overhead_ms"] == pytest.approx(0.35)


def test_repeats_pool_the_tier_mix_and_floors_keep_only_what_every_repeat_agrees_on():
    # Review helper-181: the last repeat's tier mix stood beside the median served width,
    # and the last repeat's p90 / throughput beside the floors' median p50.
    runs = [_run(100, 2.0, tiers={"w100": 1.0}), _run(100, 2.0, tiers={"w025": 1.0}),
            _run(100, 2.0, tiers={"w100": 0.5, "w025": 0.5})]  # fmt: skip
    runs[1]["answered"] = 300  # the w025 repeat answered three times as many
    mix = peers.headline(runs)["tier_mix"]
    assert mix == pytest.approx({"w100": 0.3, "w025": 0.7})
    each = [{"engine": {"p50_ms": 0.6, "p90_ms": 0.7, "cpus": [1]}},
            {"engine": {"p50_ms": 1.0, "p90_ms": 1.4, "cpus": [1]}}]  # fmt: skip
    engine = peers.median_floors(each)["engine"]
    assert engine == {"p50_ms": 0.8, "cpus": [1], "p50_ms_range": [0.6, 1.0]}

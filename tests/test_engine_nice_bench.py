"""bench/engine_nice.py's summary on a synthetic result: medians per setting, and the
per-repeat ratio it reports (nice 5 over nice 0) is read from the runs."""

from __future__ import annotations

import json

from bench import engine_nice


def test_the_summary_reads_each_points_medians_and_ratios(tmp_path):
    c8 = {"0": [{"throughput_per_s": 700.0, "p50_ms": 10.0, "answered": 9}],
          "5": [{"throughput_per_s": 980.0, "p50_ms": 7.5, "answered": 9}]}  # fmt: skip
    opened = {n: [{"within_budget": w, "w100_share": 1.0, "goodput_per_s": 1.0, "sent": 2,
                   "answered": 2}] for n, w in (("0", 0.5), ("5", 1.0))}  # fmt: skip
    results = {"setup": {"tree": "x"}, "points": [
        {"id": "c8", "rate_per_s": None, "runs": c8,
         "median": {n: r[0] for n, r in c8.items()},
         "throughput_per_s_ratio_5_over_0_per_repeat": [1.4]},
        {"id": "open-900", "rate_per_s": 900.0, "runs": opened,
         "median": {n: r[0] for n, r in opened.items()},
         "within_budget_ratio_5_over_0_per_repeat": [2.0]},
    ], "wall_seconds": 1.0}  # fmt: skip
    text = engine_nice.summarise(results)
    assert "700.0 req/s p50 10.00 ms" in text and "980.0 req/s p50  7.50 ms" in text
    assert " 50.0 % in budget" in text and "100.0 % in budget" in text
    assert "5/0 per repeat 1.40" in text and "5/0 per repeat 2.00" in text
    engine_nice.plot(json.loads(json.dumps(results)), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_baseline_tree_is_a_third_arm_with_its_own_ratio(tmp_path):
    args = engine_nice.parse(["--baseline-tree", str(engine_nice.ROOT), "--threads", "2"])
    assert [label for label, _, _ in engine_nice.arms(args)] == ["0", "5", "base-5"]
    runs = {n: [{"throughput_per_s": t, "p50_ms": 9.0, "answered": 9}]
            for n, t in (("0", 700.0), ("5", 980.0), ("base-5", 800.0))}  # fmt: skip
    results = {"setup": {"tree": "x"}, "params": {"threads": 2}, "points": [
        {"id": "c8", "rate_per_s": None, "runs": runs,
         "median": {n: r[0] for n, r in runs.items()},
         "throughput_per_s_ratio_5_over_0_per_repeat": [1.4],
         "throughput_per_s_ratio_5_over_base_per_repeat": [1.225]},
    ], "wall_seconds": 1.0}  # fmt: skip
    text = engine_nice.summarise(results)
    assert "engine_nice base-5" in text and "800.0 req/s" in text
    assert "5/0 per repeat 1.40; 5/base per repeat 1.23" in text
    engine_nice.plot(json.loads(json.dumps(results)), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_set_threads_writes_the_serving_copys_model_yaml(tmp_path):
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "model.yaml").write_text("threads: 1\nmax_batch: 8\n")
    engine_nice.set_threads(tmp_path, 2)
    text = (tmp_path / "mlp" / "model.yaml").read_text()
    assert "threads: 2" in text and "spin: false" in text and "max_batch: 8" in text


def test_points_select_the_points_run():
    args = engine_nice.parse(["--points", "open-*", "--rates", "900,1500"])
    points = [{"id": "c8"}, {"id": "open-900"}, {"id": "open-1500"}]
    assert [p["id"] for p in engine_nice.select(points, args.points)] == ["open-900", "open-1500"]


def test_over_six_repeats_three_arms_take_every_position_and_follow_each_other_equally():
    orders = [engine_nice.order(["0", "5", "b"], r) for r in range(6)]
    for arm in "05b":
        assert sorted(o.index(arm) for o in orders) == [0, 0, 1, 1, 2, 2]
    pairs = [(o[i], o[i + 1]) for o in orders for i in range(2)]
    assert {pairs.count(p) for p in set(pairs)} == {2} and len(set(pairs)) == 6
    assert [engine_nice.order(["0", "5"], r) for r in range(2)] == [["0", "5"], ["5", "0"]]

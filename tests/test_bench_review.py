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


# -- finding 3: a run with no requests is no evidence that a goal was met ---------------------
def test_an_empty_loadgen_run_reads_as_full_attainment_in_the_summary():
    from sim.loadgen import _summary

    s = _summary([], [], [], [], 1.0, None)  # what the fixes below guard against
    assert s["slo_attainment"] == 1.0 and s["sent"] == 0


def test_multi_model_goal_is_not_met_by_a_stream_that_sent_nothing():
    from bench import multi_model
    from sim.loadgen import _summary

    a, b = multi_model.MODELS[:2]
    full = {"sent": 100, "slo_attainment": 1.0}
    empty = _summary([], [], [], [], 1.0, None)
    assert multi_model.attains_goal({a: full, b: full})
    assert not multi_model.attains_goal({a: full, b: empty})
    assert not multi_model.attains_goal({a: full})  # a model with no summary at all
    assert not multi_model.attains_goal({a: full, b: {"sent": 100, "slo_attainment": 0.9}})


def test_scheduler_goal_counts_an_empty_simulated_cell_as_short():
    from bench import scheduler

    def row(policy: str, att: float, requests: int) -> dict:
        return {"policy": policy, "profile": "own", "trace": "poisson", "load": 1.0,
                "slo_attainment": att, "mean_served_accuracy": 0.9, "requests": requests,
                "per_seed": [{"requests": requests, "slo_attainment": att}]}  # fmt: skip

    ok = scheduler.goals([row("innfer", 1.0, 500), row("slackfit", 1.0, 500)])
    assert ok["attainment_met"] == 1 and ok["met"] == 1
    empty = scheduler.goals([row("innfer", 1.0, 0), row("slackfit", 1.0, 0)])
    assert empty["attainment_met"] == 0 and empty["met"] == 0
    assert "no requests" in empty["misses"][0]


# -- finding 5: decision_cost times old and new code equally often, interleaved --------------
def test_decision_cost_turns_interleave_equal_samples():
    from bench import decision_cost

    order = decision_cost.turns(["old", "new"], 5)
    assert order.count("old") == order.count("new") == 5
    rounds = [order[k : k + 2] for k in range(0, 10, 2)]
    assert all(sorted(r) == ["new", "old"] for r in rounds)  # one of each per round
    assert {r[0] for r in rounds} == {"old", "new"}  # neither always first


def test_decision_cost_times_both_implementations_the_same_number_of_times():
    import numpy as np

    from bench import decision_cost
    from server import scheduling

    mods = {"old": scheduling, "new": scheduling}
    tier_lists = {impl: decision_cost.tiers(m, 40.0) for impl, m in mods.items()}
    for mix in decision_cost.MIXES:
        spec = decision_cost.queue_spec(50, mix, np.random.default_rng(0))
        dec, work = decision_cost.time_decisions(mods, tier_lists, spec, 12)
        assert len(dec["old"]) == len(dec["new"]) == 12 and len(work) == 12
        adm = decision_cost.time_admissions(mods, tier_lists, spec, 12, 0, mix == "grouped")
        assert len(adm["old"]) == len(adm["new"]) == 12
    # the grouped queue's requests are of several groups, and keep them when put back
    groups = {
        r.get("group") for r in decision_cost.queue_spec(200, "grouped", np.random.default_rng(1))
    }
    assert len(groups) > 8 and None not in groups


# -- finding 6: text_serving's warm-up, pinning and per-tree repositories --------------------
def test_text_serving_warms_up_on_sentences_it_does_not_measure():
    import numpy as np

    from bench import text_serving

    texts = [f"s{i}" for i in range(10 + text_serving.WARMUP)]
    tokens = np.arange(len(texts))
    measured, warm, tok = text_serving.split_workload(texts, tokens, 10)
    assert measured == texts[:10] and len(warm) == text_serving.WARMUP
    assert not set(warm) & set(measured)
    assert list(tok) == list(range(10))  # the warm-up sentences are not in the statistics


def test_text_serving_pins_servers_only_where_the_client_was_pinned():
    from bench import text_serving

    assert text_serving.server_cpus({"pinned": True}, {1}) == {1}
    assert text_serving.server_cpus({"pinned": False}, {1}) is None


def test_each_tree_serves_its_own_copy_of_the_repository(tmp_path):
    from bench.live_scheduler import copy_per_tree

    model = tmp_path / "src" / "minilm"
    model.mkdir(parents=True)
    (model / "model.yaml").write_text("name: minilm\n")
    trees = {"current": tmp_path / "a", "baseline": tmp_path / "b"}
    repos = copy_per_tree(model, trees, tmp_path / "work", "lanes")
    assert repos["current"] != repos["baseline"]
    for repo in repos.values():
        assert (repo / "minilm" / "model.yaml").read_text() == "name: minilm\n"
    (repos["baseline"] / "minilm" / "cache").write_text("old tree's")
    assert not (repos["current"] / "minilm" / "cache").exists()
    again = copy_per_tree(model, trees, tmp_path / "work", "lanes")  # a fresh copy per run
    assert not (again["baseline"] / "minilm" / "cache").exists()


# -- finding 7: per-repeat Little's law, a missing size gap, an empty answered set ----------
def test_live_scheduler_keeps_littles_law_per_repeat():
    from bench import live_scheduler as ls

    rows = []
    for repeat, goodput in ((0, 50.0), (1, 70.0)):
        row = {"id": ls.BOUND_POINT, "repeat": repeat, "live": {"current": {}}}
        row["littles_law"] = {"tier": "w025", "bound_per_s": 100.0,
                              "current": {"achieved_per_s": goodput}}  # fmt: skip
        rows.append(row)
    rows.append({"id": "other", "repeat": 0, "live": {}})
    got = ls.littles_law_rows(rows)
    assert [g["repeat"] for g in got] == [0, 1]
    assert [g["current"]["achieved_per_s"] for g in got] == [50.0, 70.0]


def test_live_scheduler_sim_at_load_scales_each_tiers_latencies_by_its_factor():
    # The open-loop points are simulated again on the profile the live server planned with
    # (stored x innfer_tier_latency_factor): only the named tiers, only the *_ms figures,
    # the stored profile untouched.
    from bench import live_scheduler as ls

    stored = {"tiers": {"w100": {"1": {"p50_ms": 10.0, "p90_ms": 12.0, "runs": 30}},
                        "w025": {"1": {"p50_ms": 2.0, "p90_ms": 3.0, "runs": 30}}}}  # fmt: skip
    got = ls.scaled_profile(stored, {"w100": 0.5})
    assert got["tiers"]["w100"]["1"] == {"p50_ms": 5.0, "p90_ms": 6.0, "runs": 30}
    assert got["tiers"]["w025"]["1"] == {"p50_ms": 2.0, "p90_ms": 3.0, "runs": 30}
    assert stored["tiers"]["w100"]["1"]["p50_ms"] == 10.0


def test_live_scheduler_reads_a_process_cpu_from_proc_as_the_kernel_counts_it():
    # The transport floor's CPU per request comes from /proc/PID/stat (utime + stime): the
    # fields after the command name, which may itself hold spaces and parentheses.
    import os
    import time

    from bench import live_scheduler as ls

    end = time.process_time() + 0.2
    while time.process_time() < end:  # burn a little CPU so that both clocks move
        pass
    t = os.times()
    assert ls.process_cpu_s(os.getpid()) == pytest.approx(t.user + t.system, abs=0.05)


def test_shared_core_gap_without_a_size_is_not_within_the_goal():
    from bench import shared_core

    live = {"slo_attainment": 0.95, "mean_served_size": None, "sent": 100}
    sim = {"slo_attainment": 0.951, "mean_served_size": 0.6}
    g, within = shared_core.gap(live, sim)
    assert g["mean_served_size"] is None and within is False
    g, within = shared_core.gap(live | {"mean_served_size": 0.62}, sim)
    assert within is True and g["mean_served_size"] == pytest.approx(0.02)
    empty = {"slo_attainment": 1.0, "mean_served_size": 0.6, "sent": 0}
    assert shared_core.gap(empty, {"slo_attainment": 1.0, "mean_served_size": 0.6})[1] is False


def _auto_run(auto_acc, hand_acc, auto_att=0.99, hand_att=0.99) -> dict:
    def arm(acc, att):
        p = {"attainment": att, "mean_served_accuracy": acc, "served_accuracy": acc,
             "mean_served_width": None if acc is None else 0.5}  # fmt: skip
        return {"phase1": p, "phase2": p}

    arms = {"hand": arm(hand_acc, hand_att), "fixed": arm(0.9, 0.99),
            "auto": arm(auto_acc, auto_att), "auto_prev": arm(0.9, 0.99)}  # fmt: skip
    return {"arms": arms}


def test_auto_tiers_aggregate_records_an_empty_answered_set_as_not_met():
    from bench import auto_tiers

    ok = auto_tiers.aggregate([_auto_run(0.95, 0.90), _auto_run(0.96, 0.92)])
    assert ok["goal_met"] is True
    # one seed's auto arm answered nothing in phase 2: no accuracy to compare
    got = auto_tiers.aggregate([_auto_run(None, 0.90), _auto_run(0.96, 0.92)])
    assert got["goal_met"] is False
    assert got["auto_minus_hand_phase2"]["seeds_without_figures"] == 1
    none = auto_tiers.aggregate([_auto_run(None, None, None, None)])
    assert none["goal_met"] is False and none["auto"]["phase2"]["attainment"]["mean"] is None
    text = auto_tiers.table(
        {"models": [{"model": "m", "accuracy_source": "x", "runs": [1], "summary": none}]}
    )
    assert "NOT met" in text
    import numpy as np

    arm = {"met": np.zeros(3, bool), "accuracy": np.zeros(3), "width": np.full(3, np.nan)}
    s = auto_tiers.summarise(arm, np.zeros(3, bool))  # a phase with no requests
    assert s["requests"] == 0 and s["attainment"] is None


def test_auto_tiers_swap_exposure_counts_requests_within_the_longest_budget_of_a_swap():
    """A replayed swap starts its segment on an empty device; only requests arriving within
    the longest budget after it can be flattered, and the run reports how many."""
    import numpy as np

    from bench import auto_tiers
    from sim.tiering import Traffic

    t = Traffic(np.array([0.0, 1.0, 1.01, 1.05, 1.2, 3.0]),
                np.array([10.0, 10.0, 100.0, 10.0, 10.0, 10.0]), np.ones(6, int))  # fmt: skip
    sets = [{"at": 0.0}, {"at": 1.0}, {"at": 2.95}]
    got = auto_tiers.swap_exposure(sets, t)  # horizon 0.1 s: 1.0, 1.01, 1.05 and 3.0
    assert got["requests"] == 4 and got["share"] == 4 / 6 and got["horizon_s"] == 0.1
    assert auto_tiers.swap_exposure(sets[:1], t)["requests"] == 0  # no swap, no exposure


# -- finding 8: A/B benches rotate their arm order ------------------------------------------
def test_rotated_puts_every_arm_first_in_turn():
    from bench.order import rotated

    arms = ["hand", "auto", "auto_prev"]
    firsts = [rotated(arms, k)[0] for k in range(3)]
    assert firsts == arms and rotated(arms, 4) == ["auto", "auto_prev", "hand"]
    assert all(sorted(rotated(arms, k)) == sorted(arms) for k in range(5))
    assert rotated([], 2) == []


# -- finding 9: calibration's "beats" needs every seed's paired difference, not the mean -----
def _calibration(inn: list[float], base: list[float]) -> dict:
    from bench import calibration

    runs = []
    for s, (a, b) in enumerate(zip(inn, base, strict=True)):
        acc = {"inn_calibrated": [a]} | {m: [b] for m in calibration.BASELINES}
        runs.append({"seed": s, "full": 0.95, "accuracy": {"10": acc}})
    return {"widths": [0.5], "models": {"mlp": runs}}


def test_calibration_a_positive_mean_margin_with_a_losing_seed_is_within_noise():
    from bench import calibration

    # mean margin +1 point, but seed 1 loses by 2 points
    g = calibration.goal_check(_calibration([0.95, 0.90, 0.95], [0.93, 0.92, 0.92]))["mlp"]["10"]
    assert g["margin_over_best_baseline"]["0.5"] > 0
    assert g["beats_baselines_every_width"] is False and g["pass"] is False
    assert g["verdict_per_width"]["0.5"] == "within noise"
    assert g["per_seed_differences"]["0.5"]["scratch"] == pytest.approx([0.02, -0.02, 0.03])
    win = calibration.goal_check(_calibration([0.95, 0.94, 0.95], [0.93, 0.94, 0.92]))
    assert win["mlp"]["10"]["beats_baselines_every_width"] is True
    assert win["mlp"]["10"]["verdict_per_width"]["0.5"] == "beats"


def test_calibration_paired_win():
    from bench.calibration import paired_win

    assert paired_win([0.01, 0.0, 0.02]) == "beats"
    assert paired_win([0.01, -0.001, 0.02]) == "within noise"
    assert paired_win([0.05]) == "within noise"  # one seed: no spread to judge by
    assert paired_win([-0.01, -0.02]) == "behind"


# -- finding 10: bench/server.py reports the median [min-max] over repeats ------------------
def test_server_bench_summarises_repeats_by_median_and_range():
    from bench import server

    runs = [{"p50_ms": p, "p99_ms": 2 * p, "throughput_per_s": 1000 / p, "requests": 800}
            for p in (1.0, 1.4, 1.1)]  # fmt: skip
    out = server.over_repeats(runs)
    assert out["p50_ms"] == 1.1 and out["p50_ms_range"] == [1.0, 1.4]
    assert out["repeats"] == 3 and out["requests"] == 2400
    assert "p50_ms_range" not in server.over_repeats(runs[:1])
    assert server._fig(out, "p50_ms", ".1f") == "1.1 [1.0-1.4]"


def test_auto_tiers_live_phase_without_requests_has_no_attainment():
    # met[mask].mean() over no requests was NaN (invalid JSON, "nan%" in the table).
    import numpy as np

    from bench import auto_tiers_live

    mask = np.zeros(3, bool)
    met, served = np.ones(3, bool), np.array([0.5, 0.5, np.nan])
    p = auto_tiers_live.phase(mask, met, served, np.array(["OK"] * 3))
    assert p["sent"] == 0 and p["attainment"] is None and p["mean_served_size"] is None
    text = auto_tiers_live.table({"arms": {"hand": {"phases": {"phase2": p}, "failed": {},
                                                    "swaps": []}}})  # fmt: skip
    assert "attainment -," in text
    assert auto_tiers_live.phase(~mask, met, served, np.array(["OK"] * 3))["attainment"] == 1.0


def test_each_live_point_alternates_which_tree_goes_first_across_its_repeats():
    # With two points, the row's place alone put the same tree first at a point in every
    # repeat (closed-c8-b30: "current" first 3 of 3 in session 43's files).
    from bench.live_scheduler import arm_order

    for points in (1, 2, 3, 4):
        for index in range(points):
            firsts = [arm_order(["current", "baseline"], r, index)[0] for r in range(4)]
            assert firsts.count("current") == firsts.count("baseline") == 2, (points, index)


def test_the_transformer_lead_is_not_judged_when_the_arms_ran_unequal_steps():
    # The same seconds on a machine whose speed drifted between arms: the INN ran 849 steps
    # against 701-714 and the JSON said "met" (review helper-130).
    from bench import transformers as tb

    def rows(inn_steps: int) -> dict:
        out = {"inn_distil": {t: {"cosine": 0.96, "top10": 0.79, "steps": inn_steps}
                              for t in tb.GOAL_TIERS}}  # fmt: skip
        for m in tb.BASELINES:
            out[m] = {t: {"cosine": 0.945, "top10": 0.77, "steps": 705} for t in tb.GOAL_TIERS}
        return out

    latency = {t: {"ratio_to_full": 0.5} for t in tb.GOAL_TIERS}
    tier = tb.GOAL_TIERS[0]
    unequal = tb.goals(rows(849), latency)[f"ahead_of_baselines_by>=0.01 {tier}"]
    assert unequal["met"] is None and "--equal-steps" in unequal["why"]
    equal = tb.goals(rows(712), latency)[f"ahead_of_baselines_by>=0.01 {tier}"]
    assert equal["met"] is True and equal["steps_ratio_max_to_min"] < 1.05


def test_auto_tiers_live_counts_refusals_around_a_swap():
    # "failed" leaves the scheduler's refusals out: a swap that refused requests read as
    # "0 failed" (review helper-130). around_swaps counts every answer but OK near one.
    import json
    from datetime import datetime, timezone

    import numpy as np

    from bench import auto_tiers_live

    t0 = 1_000_000.0
    ts = datetime.fromtimestamp(t0 + 10.0, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    # server/autotier.py's line as it is logged (the new set as "frontier:<tiers>": a pattern
    # for a list there found no swap in a real run's log - swaps [] beside two swaps)
    log = ("===== auto: innfer serve\n"
           + json.dumps({"ts": ts + "Z", "level": "info", "msg": "model m: tiers ['w100'] -> "
                         "frontier:w100,w050 (expected: served accuracy +1.28%, attainment "
                         "+0.00% on 1223 recent requests, budgets p50 48.3 ms, 61.1 req/s); "
                         "swapped in 3.0 s"}) + "\n")  # fmt: skip
    swaps = auto_tiers_live.swap_events(log, t0)
    assert swaps == [{"from": ["w100"], "to": ["w100", "w050"], "seconds": 3.0, "at_s": 10.0}]
    arrivals = np.array([1.0, 6.5, 8.0, 11.0, 11.5, 20.0])
    codes = np.array(["DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED", "OK",
                      "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"])  # fmt: skip
    near = auto_tiers_live.around_swaps(swaps, arrivals, codes, after_s=2.0)
    assert near["sent"] == 3  # 7 .. 12 s: the apply's 3 s, then 2 s after the swap
    assert near["not_ok"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 1}
    arm = {"phases": {}, "failed": {}, "swaps": swaps, "around_swaps": near}
    assert "around swaps" in auto_tiers_live.table({"arms": {"auto": arm}})


def test_auto_tiers_live_settled_compares_every_arm_after_the_last_swap_in_phase_2():
    # Phase 2 as a whole counts the time auto-tiering takes to answer the shift: live, its
    # swap came 46 s into a 60 s phase, and the phase's size said nothing of the set it
    # chose (session 61). ``settled`` is every arm over the same stretch after the auto
    # arms' last swap in phase 2 (a swap in phase 1 does not count).
    import numpy as np

    from bench import auto_tiers_live

    arrivals = np.array([5.0, 61.0, 70.0, 80.0, 95.0, 99.0])
    arms = {}
    for arm, served, swaps in (
        ("hand", [1.0, 0.1, 0.1, 0.1, 0.1, 0.1], []),
        ("auto", [1.0, 0.1, 0.1, 0.3, 0.3, 0.3], [10.0, 75.0]),
        ("auto_prev", [1.0, 0.1, 0.1, 0.1, 0.2, 0.2], [90.0]),
    ):
        codes = np.array(["OK"] * 6)
        arms[arm] = {"swaps": [{"at_s": at} for at in swaps],
                     "_outcomes": (np.ones(6, bool), np.array(served), codes)}  # fmt: skip
    out = auto_tiers_live.settled(arms, arrivals, shift=60.0)
    assert out["from_s"] == 92.0  # auto_prev's swap at 90 s, + SWAP_AFTER_S
    assert out["hand"]["sent"] == 2 and out["hand"]["mean_served_size"] == pytest.approx(0.1)
    assert out["auto"]["mean_served_size"] == pytest.approx(0.3)
    assert out["auto_prev"]["mean_served_size"] == pytest.approx(0.2)
    assert all("_outcomes" not in r for r in arms.values())  # not written to the JSON
    outcomes = (np.ones(6, bool), np.full(6, 0.5), np.array(["OK"] * 6))
    none = {"hand": {"swaps": [], "_outcomes": outcomes}}
    assert auto_tiers_live.settled(none, arrivals, shift=60.0)["from_s"] == 60.0


def test_live_scheduler_takes_other_client_counts_and_shared_core_sweeps_them():
    # --concurrency: closed-loop points at other client counts than the 1, 8, 32;
    # bench/shared_core.py --sweep-clients replays such loops on the shared core, where
    # past the core's capacity the goodput within budget collapses (live and simulated).
    from bench import live_scheduler as ls
    from bench import shared_core
    from server.scheduling import TierInfo

    ids = [p["id"] for p in ls.all_points((10, 12))]
    assert "closed-c10-b30" in ids and "closed-c12-u20-100" in ids
    assert not any("c8" in i for i in ids) and "open-2x" in ids
    tiers = [TierInfo("w100", 1.0, {1: 3.0, 8: 24.0})]
    p50 = {"w100": {1: 3.0, 8: 24.0}}
    params = {"seed": 0, "requests": 400, "seconds": 10.0}
    host = (0.5, 0.3, 0.0, 0.2)  # ms: parse, answer, client, per batch
    rows = shared_core.sweep([2, 40], params, tiers, p50, {"w100": 1.0}, host, 0.999)
    few, many = rows
    assert (few["clients"], many["clients"]) == (2, 40)
    assert few["slo_attainment"] > 0.99  # 2 x ~4 ms of a core: every request in 30 ms
    assert many["goodput_per_s"] < 0.5 * few["goodput_per_s"]  # 40 x 4 ms > 30 ms

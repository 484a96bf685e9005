"""sim.shared_core: the scheduler, its engine and request handling on one core."""

from __future__ import annotations

import numpy as np
import pytest

from server.scheduling import TierInfo
from sim.shared_core import HostCost, simulate_shared

ONE = [TierInfo("w100", 1.0, {1: 10.0, 8: 40.0})]
ONE_P50 = {"w100": {1: 10.0, 8: 40.0}}
TWO = [TierInfo("w100", 1.0, {1: 10.0, 8: 40.0}), TierInfo("w025", 0.25, {1: 2.0, 8: 8.0})]
TWO_P50 = {"w100": {1: 9.0, 8: 36.0}, "w025": {1: 1.8, 8: 7.2}}


def test_a_lone_request_pays_parse_compute_answer_and_client():
    host = HostCost(parse_s=0.001, answer_s=0.0005, client_s=0.002)
    r = simulate_shared(ONE, ONE_P50, host, lambda i: 1.0, arrivals=np.array([0.0]), noise=0.0)
    assert r.states == ["served"]
    assert r.latency_ms[0] == pytest.approx(1.0 + 10.0 + 0.5 + 2.0)


def test_handling_and_the_engine_share_the_core():
    # Request 1 is sent as request 0's batch starts (t = P): its parsing and that batch
    # run at half speed together; the batch ends at E + 2P. Request 1's batch then starts
    # while request 0's answer is sent: both at half speed again, the answer done at
    # E + 2P + 2A.
    P, A, E = 0.001, 0.0005, 0.010
    host = HostCost(parse_s=P, answer_s=A)
    r = simulate_shared(ONE, ONE_P50, host, lambda i: 1.0, arrivals=np.array([0.0, P]),
                        noise=0.0)  # fmt: skip
    assert r.latency_ms[0] == pytest.approx((E + 2 * P + 2 * A) * 1e3)


def test_closed_loop_throughput_is_bounded_by_the_cpu_each_request_costs():
    # 8 clients, the fast tier pinned by policy: each request costs 2 ms of handling plus
    # its share of a batch (7.2 / 8 ms): at most ~345 per second on one core.
    host = HostCost(parse_s=0.0012, answer_s=0.0008)
    r = simulate_shared(TWO, TWO_P50, host, lambda i: 1.0, clients=8, n_requests=2000,
                        max_seconds=30.0, policy="fixed:w025", noise=0.0)  # fmt: skip
    s = r.summary
    assert s["sent"] == 2000 and s["refused_total"] == 0
    bound = 1 / (0.002 + 0.0072 / 8)
    # at most the bound (full batches); batches of fewer rows cost more per row
    assert 0.6 * bound < s["goodput_per_s"] <= bound * 1.01
    free = simulate_shared(TWO, TWO_P50, HostCost(0.0, 0.0), lambda i: 1.0, clients=8,
                           n_requests=2000, policy="fixed:w025", noise=0.0)  # fmt: skip
    assert free.summary["goodput_per_s"] > 2 * s["goodput_per_s"]


def test_host_cost_makes_the_planner_pick_smaller_tiers():
    # Open loop at a load the full tier carries alone; with handling on the same core the
    # batches stretch, the correction learns it and fewer requests get the full tier.
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / 150, 3000))
    budgets = rng.uniform(0.020, 0.100, len(arrivals))
    widths = {"w100": 1.0, "w025": 0.25}
    runs = {
        h: simulate_shared(
            TWO, TWO_P50, HostCost(h, h), lambda i: budgets[i], arrivals=arrivals, widths=widths
        ).summary
        for h in (0.0, 0.0015)
    }
    assert runs[0.0]["slo_attainment"] > 0.99
    assert runs[0.0015]["mean_served_size"] < runs[0.0]["mean_served_size"] - 0.05
    for s in runs.values():
        assert s["sent"] == s["within_budget"] + s["late"] + s["refused_total"] == 3000


def test_the_planner_is_told_the_host_cpu_per_row(monkeypatch):
    """The server meters its CPU per row outside the engine and hands it to the planner
    (``Scheduler.host_s``); the simulator hands it its ``HostCost``. At 200 rows/s with
    1 ms of handling each, a planner told that handling shares the core keeps step 1's
    tighter bound and lets the full tier in less often than one that plans as if the
    engine had the core to itself."""
    import sim.shared_core as shared_core

    class Deaf(shared_core.Scheduler):
        host_s = property(lambda self: 0.0, lambda self, value: None)

    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / 200, 3000))
    budgets = rng.uniform(0.020, 0.100, len(arrivals))
    widths = {"w100": 1.0, "w025": 0.25}

    def run():
        return simulate_shared(TWO, TWO_P50, HostCost(0.0006, 0.0004), lambda i: budgets[i],
                               arrivals=arrivals, widths=widths).summary  # fmt: skip

    told = run()
    monkeypatch.setattr(shared_core, "Scheduler", Deaf)
    deaf = run()
    assert told["mean_served_size"] < deaf["mean_served_size"] - 0.03
    assert told["slo_attainment"] > 0.998


def test_a_batch_costs_the_core_once_before_its_answers_and_the_next_batch():
    # One request: parse, its batch, the loop's settling of it, its answer, the client.
    P, A, B, E = 0.001, 0.0005, 0.0004, 0.010
    host = HostCost(parse_s=P, answer_s=A, batch_s=B)
    one = simulate_shared(ONE, ONE_P50, host, lambda i: 1.0, arrivals=np.array([0.0]), noise=0.0)
    assert one.latency_ms[0] == pytest.approx((P + E + B + A) * 1e3)
    assert one.summary["batches"] == 1
    # Two requests, the second sent at 2P and parsed while the first runs (both at half
    # speed: the first batch, started at P, ends at E + 2P); the second's batch waits for
    # the first's settling (it starts at E + 2P + B), and the first's answer shares the
    # core with it.
    P2 = 0.002
    two = simulate_shared(ONE, ONE_P50, HostCost(P, A, batch_s=B), lambda i: 1.0,
                          arrivals=np.array([0.0, P2]), noise=0.0, policy="fixed:w100",
                          max_batch=1)  # fmt: skip
    assert two.states == ["served", "served"] and two.summary["batches"] == 2
    assert two.latency_ms[0] == pytest.approx((P + E + P + B + 2 * A) * 1e3)


def test_a_per_batch_cost_grows_batches_on_a_full_core_as_the_server_does():
    # The engine runs 8 rows in 8x one row's time (batching buys no engine time: planned
    # batches of one), 8 closed-loop clients fill the core: with 0.4 ms of the loop per
    # batch the planner grows batches (Scheduler.batch_host_s) and the core serves more.
    tiers = [TierInfo("w025", 1.0, {1: 2.0, 8: 16.0})]
    p50 = {"w025": {1: 2.0, 8: 16.0}}
    runs = {
        b: simulate_shared(tiers, p50, HostCost(0.0006, 0.0004, batch_s=b), lambda i: 0.030,
                           clients=8, n_requests=1500, max_seconds=30.0, noise=0.0).summary
        for b in (0.0, 0.0004)
    }  # fmt: skip
    assert runs[0.0]["rows_per_batch"] < 1.3  # no per-batch cost: batches of one
    assert runs[0.0004]["rows_per_batch"] > 1.5, runs
    grown = runs[0.0004]
    assert grown["refused_total"] == 0  # every request served, in fewer batches
    assert grown["batches"] * grown["rows_per_batch"] == pytest.approx(grown["sent"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="arrivals"):
        simulate_shared(ONE, ONE_P50, HostCost(0, 0), lambda i: 1.0)
    with pytest.raises(ValueError, match="parse_s"):
        HostCost(parse_s=-1.0, answer_s=0.0)
    with pytest.raises(ValueError, match="batch_s"):
        HostCost(parse_s=0.0, answer_s=0.0, batch_s=float("nan"))


def test_the_live_runs_cpu_account_sets_the_host_cost():
    # bench/live_scheduler.py reads the server's CPU from its metrics before and after a
    # point; bench/shared_core.py replays the points with the median of what it measured.
    from bench.live_scheduler import cpu_per_request
    from bench.shared_core import DEFAULT_HOST_MS, measured_host

    before = {"process_s": 10.0, "engine_cpu_s": 4.0, "engine_wall_s": 5.0}
    after = {"process_s": 15.0, "engine_cpu_s": 6.0, "engine_wall_s": 8.0}
    got = cpu_per_request(before, after, sent=1000)
    assert got == pytest.approx(
        {"process_ms": 5.0, "engine_ms": 2.0, "host_ms": 3.0, "engine_wall_over_cpu": 1.5}
    )
    assert cpu_per_request(before, {"process_s": 15.0}, sent=1000) is None  # an older server

    def point(host_ms):
        cpu = None if host_ms is None else {"host_ms": host_ms}
        return {"live": {"current": {"server_cpu": cpu}}}

    live = {"points": [point(1.0), point(3.0), point(2.0), point(None)]}
    (parse, answer, client, batch), note = measured_host(live)
    assert parse + answer == pytest.approx(2.0) and parse > answer  # the median, split
    assert client == DEFAULT_HOST_MS[2] and "3 points" in note
    assert batch == 0.0  # a live file without the per-batch gauge
    assert measured_host({"points": [point(None)]})[0] == (*DEFAULT_HOST_MS, 0.0)
    # With the batches run and the server's per-batch gauge (read at the point's end), the
    # batches' share leaves the per-request figure and is charged per batch.
    after = {**after, "batches": 500.0, "host_per_batch": 0.0004, "host_per_row": 0.0025}
    got = cpu_per_request({**before, "batches": 0.0}, after, sent=1000)
    assert got["batches_per_request"] == pytest.approx(0.5)
    assert got["host_per_batch_ms"] == pytest.approx(0.4)  # the gauge itself, not a change
    assert got["host_per_row_ms"] == pytest.approx(2.5)
    cpus = [dict(got, host_ms=h) for h in (3.0, 2.0, 4.0)]
    live = {"points": [{"live": {"current": {"server_cpu": c}}} for c in cpus]}
    (parse, answer, _, batch), note = measured_host(live)
    assert batch == pytest.approx(0.4) and "per batch" in note
    assert parse + answer == pytest.approx(3.0 - 0.4 * 0.5)
    assert sum(measured_host(live, per_batch=False)[0][:2]) == pytest.approx(3.0)


def test_innfer_simulate_with_host_ms_serves_on_one_shared_core(tmp_path, capsys):
    # `innfer simulate --host-ms PARSE,ANSWER[,CLIENT]`: the same trace and budgets as the
    # engine-only simulation, with request handling on the engine's core. Free handling
    # meets the budgets at half the full tier's capacity; 6 ms of it per request (more
    # than the engine's own time per row on this model) cannot keep up.
    import json

    from innfer.cli import main
    from tests.serverutil import TIERS, add_onnx_model, slow_loop

    d = add_onnx_model(tmp_path, "loop", lambda w: slow_loop(w, trips=40), {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1024]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": TIERS, "max_batch": 4, "max_queue": 50, "slo_target": 0.99,
    }, warmup=1, repeats=3)  # fmt: skip
    # The spread measured in 3 runs under a loaded CI machine (p90 several times the p50)
    # planned the free case to 63 % by itself: what is judged here is the host cost, on a
    # steady spread (p90 = 1.1 x p50 of what was measured).
    profile_path = d / "profile.json"
    profile = json.loads(profile_path.read_text())
    for table in profile["tiers"].values():
        for entry in table.values():
            entry["p90_ms"] = 1.1 * entry["p50_ms"]
            entry.pop("p99_ms", None)
    profile_path.write_text(json.dumps(profile))
    out = {}
    for label, host in (("free", "0,0"), ("heavy", "4,2,0.5")):
        path = tmp_path / f"{label}.json"
        args = ["simulate", str(d), "--policy", "innfer", "--load", "0.5", "--duration", "3",
                "--host-ms", host, "--json", str(path)]  # fmt: skip
        assert main(args) == 0
        out[label] = json.loads(path.read_text())["innfer"]["summary"]
    assert "one core" in capsys.readouterr().out
    assert out["free"]["requests"] == out["heavy"]["requests"] > 20  # the same trace
    assert out["heavy"]["host_ms"] == {"parse": 4.0, "answer": 2.0, "client": 0.5, "batch": 0.0}
    assert out["free"]["slo_attainment"] > 0.95, out
    assert out["heavy"]["slo_attainment"] < 0.5 * out["free"]["slo_attainment"], out
    assert main(["simulate", str(d), "--host-ms", "1,1", "--slots", "2"]) != 0
    assert "--host-ms simulates one shared core" in capsys.readouterr().err
    # --host-batch-ms: the core's CPU per batch, with --host-ms only.
    assert main(["simulate", str(d), "--host-batch-ms", "0.4"]) != 0
    assert "give --host-ms PARSE,ANSWER with it" in capsys.readouterr().err
    path = tmp_path / "per-batch.json"
    assert (
        main(
            [
                "simulate",
                str(d),
                "--policy",
                "innfer",
                "--load",
                "0.5",
                "--duration",
                "3",
                "--host-ms",
                "4,2,0.5",
                "--host-batch-ms",
                "3",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    per_batch = json.loads(path.read_text())["innfer"]["summary"]
    printed = capsys.readouterr().out
    assert "+ 3 per batch" in printed  # the title, and what one core serves:
    assert "with 6 ms of request handling each and 3 ms per batch, one core serves" in printed
    assert (
        per_batch["host_ms"]["batch"] == 3.0 and per_batch["requests"] == out["heavy"]["requests"]
    )
    # Either way the scheduler runs as the model's model.yaml configures it.
    path = tmp_path / "engine-only.json"
    assert main(["simulate", str(d), "--policy", "innfer", "--duration", "1",
                 "--json", str(path)]) == 0  # fmt: skip
    config = json.loads(path.read_text())["innfer"]["config"]
    assert (config["max_queue"], config["slo_target"], config["max_batch"]) == (50, 0.99, 4)
    # A file trace is replayed as recorded: the title names it, not a --load it ignores.
    (trace := tmp_path / "arrivals.csv").write_text("0.0\n0.1\n0.2\n")
    capsys.readouterr()
    assert main(["simulate", str(d), "--policy", "innfer", "--trace", "file", "--trace-file",
                 str(trace), "--load", "7"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "trace arrivals.csv" in out and "load 7" not in out


def test_a_free_batch_is_settled_by_the_loop_like_a_cheap_one():
    # The server's loop settles every finished batch in turn (its completion callback
    # waits behind the parsing queued before it), whatever that costs: a per-batch cost of
    # 0 and of a nanosecond simulate alike (they did not: 0.68 vs 0.18 within budget here,
    # only a cost above 0 queued the settling).
    tiers = [TierInfo("w025", 1.0, {1: 1.6, 8: 13.0})]
    p50 = {"w025": {1: 1.48, 8: 11.83}}
    runs = [
        simulate_shared(tiers, p50, HostCost(0.00066, 0.0004, client_s=0.001, batch_s=b),
                        lambda i: 0.030, clients=10, n_requests=1000, max_seconds=30.0,
                        seed=0).summary
        for b in (0.0, 1e-12)
    ]  # fmt: skip
    assert runs[0]["slo_attainment"] == pytest.approx(runs[1]["slo_attainment"], abs=0.01)
    assert runs[0]["batches"] == pytest.approx(runs[1]["batches"], rel=0.02)


def test_answers_that_ran_alone_teach_the_quiet_overhead_as_the_servers_do(monkeypatch):
    # The server counts an answer as alone when its batch held one row and it queued under
    # QUIET_QUEUE_S (server.dataplane); admission judges at that quiet median where lower.
    import sim.shared_core as shared_core
    from server.overhead import Overhead

    flags = []

    class Recording(Overhead):
        def observe(self, seconds, waited=0.0, alone=False):
            flags.append(alone)
            super().observe(seconds, waited, alone)

    monkeypatch.setattr(shared_core, "Overhead", Recording)
    host = HostCost(parse_s=0.0012, answer_s=0.0008)
    # one client, requests far apart: every answer ran alone
    simulate_shared(TWO, TWO_P50, host, lambda i: 1.0, arrivals=np.arange(50) * 0.05,
                    policy="fixed:w025", noise=0.0)  # fmt: skip
    assert len(flags) == 50 and all(flags)
    # 8 clients at once: batches of several rows, queued behind the running one - none alone
    # between the start and the drain (the last sends run alone, as on a server)
    flags.clear()
    simulate_shared(TWO, TWO_P50, host, lambda i: 1.0, clients=8, n_requests=400,
                    policy="fixed:w025", noise=0.0)  # fmt: skip
    assert len(flags) == 400 and not any(flags[50:-8])
    # batches of one row (max_batch 1) that queued behind others did not run alone either
    flags.clear()
    simulate_shared(TWO, TWO_P50, host, lambda i: 1.0, clients=8, n_requests=400,
                    policy="fixed:w025", noise=0.0, max_batch=1)  # fmt: skip
    assert len(flags) == 400 and not any(flags[50:-8])

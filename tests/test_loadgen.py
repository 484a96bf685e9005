"""The closed-loop load generator against the real server (tests/conftest.py ``server``):
counts add up, refusals keep their gRPC code and message, a run stops at its bounds, extra
request parameters reach the server, and an answer without a tier is recorded as None."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import numpy as np
import pytest

from sim.loadgen import _Record, run_closed_loop, run_load

pytestmark = pytest.mark.e2e

INPUTS = {"input": np.zeros((1, 1, 8, 8), np.float32)}  # the "tiny" model, batch 1


def _adds_up(s: dict) -> bool:
    return s["sent"] == s["within_budget"] + s["late"] + s["refused_total"] == s["requests"]


def test_closed_loop_counts_add_up(server):
    # Every third budget (1 µs) is below anything a tier can do: refused at once.
    def budget(i: int) -> float:
        return 1e-6 if i % 3 == 2 else 5.0

    report = asyncio.run(
        run_closed_loop(server.address, "tiny", 4, 30, 20.0, budget, INPUTS, drain_s=10.0)
    )
    s = report.summary
    assert s["sent"] == 30 and _adds_up(s)
    assert s["concurrency"] == 4
    assert len(report.latency_ms) == len(report.codes) == len(report.budgets_s) == 30
    assert report.budgets_s[2] == 1e-6 and report.budgets_s[0] == 5.0
    refused = [c for i, c in enumerate(report.codes) if i % 3 == 2]
    assert refused == ["DEADLINE_EXCEEDED"] * 10
    assert s["refused"] == {"DEADLINE_EXCEEDED": 10} and s["refused_total"] == 10
    assert s["first_error"].startswith("DEADLINE_EXCEEDED: ")
    answered = [t for i, t in enumerate(report.tiers) if i % 3 != 2]
    assert set(answered) <= {"w100", "w050"} and None not in answered
    assert sum(s["tier_mix"].values()) == pytest.approx(1.0)


def test_closed_loop_stops_at_its_time_bound(server):
    report = asyncio.run(
        run_closed_loop(server.address, "tiny", 2, 10**6, 0.3, lambda i: 5.0, INPUTS, drain_s=10.0)
    )
    s = report.summary
    assert 0 < s["sent"] < 10**6 and _adds_up(s)
    assert len(report.codes) == s["sent"] and "unsent" not in report.codes


def test_every_client_sends_however_short_the_run_and_no_more_clients_than_requests(
    server, monkeypatch
):
    # Clients that first ran after a short max_seconds sent nothing: 1,000 clients for 1 ms
    # sent 0 requests, and `innfer bench` said 100 % within budget; a million clients for
    # 10 requests made a million tasks (review helper-236).
    report = asyncio.run(
        run_closed_loop(server.address, "tiny", 8, 100, 1e-9, lambda i: 5.0, INPUTS, drain_s=10.0)
    )
    assert report.summary["sent"] == 8 and _adds_up(report.summary)
    made, create = [], asyncio.create_task
    monkeypatch.setattr(asyncio, "create_task", lambda coro: made.append(1) or create(coro))
    report = asyncio.run(
        run_closed_loop(server.address, "tiny", 10**4, 3, 5.0, lambda i: 5.0, INPUTS, drain_s=10.0)
    )
    assert report.summary["sent"] == 3 and len(made) <= 3 + 2  # (+ the client's own, if any)


def test_closed_loop_checks_its_arguments():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_closed_loop("10.0.0.1:8001", "tiny", 1, 1, 1.0, lambda i: 1.0, INPUTS))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(run_closed_loop("127.0.0.1:1", "tiny", 0, 1, 1.0, lambda i: 1.0, INPUTS))


def test_extra_parameters_go_with_every_request(server):
    # innfer's tier pin: every answer comes from the pinned tier, in both load generators.
    report = asyncio.run(
        run_closed_loop(
            server.address, "tiny", 2, 12, 20.0, lambda i: 5.0, INPUTS, parameters={"tier": "w050"}
        )
    )
    assert report.summary["sent"] == 12 and report.tiers == ["w050"] * 12
    arrivals, budgets = np.linspace(0.0, 0.05, 6), np.full(6, 5.0)
    report = asyncio.run(
        run_load(server.address, "tiny", arrivals, budgets, INPUTS, parameters={"tier": "w050"})
    )
    assert report.codes == ["OK"] * 6 and report.tiers == ["w050"] * 6


def test_an_answer_without_a_tier_is_recorded_as_none():
    # Other OIP servers (KServe, Triton) send no "tier" response parameter.
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import InferenceServerException

    sent = {}

    class Client:
        async def infer(self, model, tensors, parameters):
            sent.update(parameters)
            return SimpleNamespace(get_response=service_pb2.ModelInferResponse)

    rec = _Record(1, "unsent", {"tier": "w100", "latency_budget_ms": 1.0})
    asyncio.run(rec.send(Client(), "m", [], 0, 0.25, InferenceServerException))
    assert rec.codes == ["OK"] and rec.tiers == [None] and rec.latency[0] >= 0
    assert sent == {"tier": "w100", "latency_budget_ms": 250.0}  # the budget takes precedence


def test_a_client_with_deadlines_sends_each_budget_as_its_grpc_deadline():
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import InferenceServerException

    timeouts = []

    class Client:
        async def infer(self, model, tensors, parameters, client_timeout=None):
            timeouts.append(client_timeout)
            return SimpleNamespace(get_response=service_pb2.ModelInferResponse)

    for deadline in (False, True):
        rec = _Record(1, "unsent", None, deadline)
        asyncio.run(rec.send(Client(), "m", [], 0, 0.03, InferenceServerException))
    assert timeouts == [None, 0.03]


def test_breakdown_splits_late_answers_by_where_the_time_went():
    from sim.loadgen import LoadReport

    # ms: latency; server's queue, compute, planned budget; client budgets 20 ms each
    latency = np.array([10.0, 25.0, 25.0, np.nan])
    server_ms = np.array([[1.0, 5.0, 19.0], [2.0, 19.0, 19.0], [1.0, 5.0, 19.0], [np.nan] * 3])
    r = LoadReport({}, latency, ["a", "a", "a", None], ["OK"] * 3 + ["DEADLINE_EXCEEDED"],
                   np.full(4, 0.020), None, server_ms)  # fmt: skip
    b = r.breakdown()
    assert b["answered_with_times"] == 3
    assert b["late_in_server"] == 1  # 2 + 19 ms past its planned 19 ms
    assert b["late_outside"] == 1  # 6 ms inside, 19 ms the server did not see
    assert b["outside_ms"]["p50"] == pytest.approx(4.0)  # of 4, 4, 19
    assert b["planned_short_ms"]["p50"] == pytest.approx(1.0)
    assert LoadReport({}, latency, [], [], None).breakdown() is None  # not an innfer server


def test_onset_reports_the_first_requests_and_the_rest_apart():
    from sim.loadgen import LoadReport

    # ms; budgets 20 ms: the first two late and refused, the rest one late and one unsent
    latency = np.array([25.0, np.nan, 10.0, 10.0, 30.0, np.nan])
    codes = ["OK", "UNAVAILABLE", "OK", "OK", "OK", "unsent"]
    r = LoadReport({}, latency, ["a"] * 6, codes, np.full(6, 0.020))
    o = r.onset(2)
    assert o["first_requests"] == 2
    assert o["first"] == {"requests": 2, "within_budget": 0, "late": 1, "refused": 1,
                          "slo_attainment": 0.0}  # fmt: skip
    assert o["rest"] == {
        "requests": 4,
        "within_budget": 2,
        "late": 1,
        "refused": 0,
        "slo_attainment": 0.5,
    }  # the unsent one is a miss, not a refusal
    assert r.onset(6) is None and r.onset(0) is None  # nothing after / nothing before
    assert LoadReport({}, latency, [], codes, None).onset(2) is None  # no budgets known


def test_closed_loop_reports_the_servers_times(server):
    x = np.zeros((1, 1, 8, 8), np.float32)
    r = asyncio.run(run_closed_loop(server.address, "tiny", 2, 6, 30.0, lambda i: 0.5,
                                    {"input": x}))  # fmt: skip
    b = r.breakdown()
    assert b["answered_with_times"] == 6
    assert b["queue_ms_p50"] >= 0 and b["compute_ms_p50"] > 0
    assert b["late_in_server"] == b["late_outside"] == 0


def test_a_call_that_runs_past_its_own_deadline_is_not_counted_as_the_servers_refusal():
    # gRPC ends the call at its deadline and says only "Deadline Exceeded"; innfer's own
    # DEADLINE_EXCEEDED (test_closed_loop_counts_add_up) says why. A run's "refused" kept
    # both under one code, so a bench could not tell the server's decisions from its own
    # timer. A real gRPC server that answers too late stands in for an overloaded one.
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from sim.loadgen import CALL_DEADLINE

    class Late(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            await asyncio.sleep(2.0)

    async def run():
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Late(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            address = f"127.0.0.1:{port}"
            return await run_closed_loop(address, "tiny", 2, 4, 10.0, lambda i: 0.05, INPUTS,
                                         deadline=True, drain_s=5.0)  # fmt: skip
        finally:
            await server.stop(0)

    s = asyncio.run(run()).summary
    assert s["refused"] == {CALL_DEADLINE: 4} and _adds_up(s)
    assert s["first_error"] == f"{CALL_DEADLINE}: Deadline Exceeded"


@pytest.mark.parametrize(
    "address, said",
    [
        ("127.0.0.1:abc", "give HOST:PORT with a port in [1, 65535]"),
        ("127.0.0.1:99999", "give HOST:PORT with a port in [1, 65535]"),
        ("127.0.0.1", "give HOST:PORT"),
        ("10.0.0.1:8001", "only targets loopback addresses"),
    ],
)
def test_the_load_generator_refuses_an_address_it_cannot_reach(address, said):
    # A bad port reached the run and ended "is a server listening?"; only loopback hosts.
    from sim.loadgen import check_loopback

    with pytest.raises(ValueError, match=re.escape(said)):
        check_loopback(address)
    check_loopback("127.0.0.1:8001")
    check_loopback("[::1]:8001")

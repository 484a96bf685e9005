"""The closed-loop load generator against the real server (tests/conftest.py ``server``):
counts add up, refusals keep their gRPC code and message, and a run stops at its bounds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sim.loadgen import run_closed_loop

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


def test_closed_loop_checks_its_arguments():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_closed_loop("10.0.0.1:8001", "tiny", 1, 1, 1.0, lambda i: 1.0, INPUTS))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(run_closed_loop("127.0.0.1:1", "tiny", 0, 1, 1.0, lambda i: 1.0, INPUTS))

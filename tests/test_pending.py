"""The pending-queue probe (server/pending.py) counts how each of its calls ended.

Under max_pending_calls a full gRPC queue cancels the probe along with the inference calls,
and the probes that get in find a short queue: the wait histogram alone read a calm p99
while 40 % of the calls were cancelled (review helper-321). These run the probe's thread
against a real gRPC server that answers or cancels as told, and against no server at all.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
import pytest

from server import pending

pytestmark = pytest.mark.e2e


def _until(check, limit_s: float = 10.0) -> bool:
    end = time.monotonic() + limit_s
    while not check() and time.monotonic() < end:
        time.sleep(0.01)
    return check()


def test_the_probe_counts_answered_and_cancelled_calls():
    calls = iter(range(1_000_000))

    def answer(body, context):  # every other call cancelled, as a full queue does
        if next(calls) % 2:
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    service, _, name = pending.METHOD[1:].rpartition("/")
    handlers = {name: grpc.unary_unary_rpc_method_handler(answer)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    outcomes: list[str] = []
    probe = pending.PendingProbe(lambda wait_s: None, outcomes.append)
    try:
        probe.start(f"127.0.0.1:{port}")
        assert _until(lambda: outcomes.count("cancelled") >= 3 and outcomes.count("answered") >= 3)
        assert "failed" not in outcomes
    finally:
        probe.stop()
        server.stop(None)


def test_a_probe_that_cannot_reach_the_server_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(pending, "RETRY_S", 0.01)
    monkeypatch.setattr(pending, "TIMEOUT_S", 0.2)
    outcomes: list[str] = []
    probe = pending.PendingProbe(lambda wait_s: None, outcomes.append)
    with caplog.at_level(logging.WARNING, logger="innfer.pending"):
        probe.start(f"127.0.0.1:{_closed_port()}")
        try:
            assert _until(lambda: len(outcomes) >= 3 * pending.WARN_AFTER)
        finally:
            probe.stop()
    assert set(outcomes) == {"failed"}
    said = [r for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_threads_end_when_stopped():
    probe = pending.PendingProbe(lambda wait_s: None)
    before = {t for t in threading.enumerate() if t.name == "innfer-pending-probe"}
    probe.start(f"127.0.0.1:{_closed_port()}")
    probe.stop()
    assert _until(
        lambda: not {t for t in threading.enumerate() if t.name == "innfer-pending-probe"} - before
    )


def test_a_backlog_is_logged_once_it_lasts(caplog):
    # Without Prometheus (innfer serve in a terminal) the log is where a backlog shows.
    p = pending.PendingProbe(lambda wait_s: None)
    n, long = pending.BACKLOG_PROBES, pending.BACKLOG_S * 10
    step = pending.BACKLOG_FOR_S  # between probes: every streak of n lasts long enough
    with caplog.at_level(logging.WARNING, logger="innfer.pending"):
        for i in range(n - 1):
            p.observed(long, step * i)
        p.observed(pending.BACKLOG_S / 2, step * n)  # a short one: the streak starts over
        for i in range(n - 1):
            p.observed(long, 100.0 + step * i)
        assert not caplog.records
        p.observed(long, 100.0 + step * n)  # the n-th in a row
        assert len(caplog.records) == 1 and "max_pending_calls" in caplog.records[0].getMessage()
        for i in range(3 * n):  # the backlog goes on: said again only after BACKLOG_LOG_S
            p.observed(long, 200.0 + step * i)
        assert len(caplog.records) == 1
        p.observed(long, 100.0 + step * n + pending.BACKLOG_LOG_S)
        assert len(caplog.records) == 2
    # n probes in a row, but within one stall of the loop (under BACKLOG_FOR_S): not logged
    quick = pending.PendingProbe(lambda wait_s: None)
    with caplog.at_level(logging.WARNING, logger="innfer.pending"):
        for i in range(2 * n):
            quick.observed(pending.BACKLOG_S * 2, 1000.0 + 0.01 * i)
    assert len(caplog.records) == 2


def test_cancelled_probes_are_logged_once_they_persist(caplog):
    # Under max_pending_calls answered probes wait little: the backlog warning stayed silent
    # while 46 % of calls were cancelled (review helper-322).
    p = pending.PendingProbe(lambda wait_s: None)
    n, within = pending.CANCELLED_PROBES, pending.CANCELLED_WITHIN_S
    with caplog.at_level(logging.WARNING, logger="innfer.pending"):
        for i in range(2 * n):  # spread out: each alone in its window
            p.cancelled(i * (within + 1))
        assert not caplog.records
        for i in range(n):
            p.cancelled(1000.0 + i)
        assert len(caplog.records) == 1 and "max_pending_calls" in caplog.records[0].getMessage()
        for i in range(10 * n):  # still cancelled: said again only after BACKLOG_LOG_S
            p.cancelled(1000.0 + n + i)
        assert len(caplog.records) == 1

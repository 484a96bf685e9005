"""How long calls wait in gRPC before the server takes them up, measured by a probe.

gRPC queues the calls it has received until the event loop asks for the next one, about
one per turn of the loop (grpc.aio keeps one request outstanding per queue). No innfer code
sees a call there, and gRPC says nothing of how long it waited. Where request handling
alone fills the CPU - a small model sent more calls per second than the process parses -
the backlog builds in that queue, not in the scheduler's, and nothing the server exported
showed it: bench/multi_model.py's MLP alone on one core at ~1.6x what it handles answered
0.3 % of its requests within budget at a client p50 of 0.7 s, while the server's own
queue time read ~20 ms. ``max_pending_calls`` bounds that queue; this module makes it
visible.

``PendingProbe`` calls the server from a thread of the same process every ``PERIOD_S``,
over a connection of its own, on a generic method - one gRPC queues with every OIP call
(a registered method has a queue of its own) - with its send time in the body. The handler
observes the time from the send to itself (``innfer_pending_wait_seconds``, a histogram):
gRPC's queue, the loop's turns before the call's task runs, and the loopback hop
(~0.1 ms). A forged call cannot add a sample: the body must carry the process's random
token. Cost: one small call per period, 20 a second - a few ms of the loop's time a second
(bench.peers on the MLP: 1.006x / 0.981x the throughput of the tree before it, within noise).

Under ``max_pending_calls`` a full queue cancels the probe with the inference calls, and a
probe that gets in finds the queue short: the histogram alone then read a calm p99 while
40 % of the calls were cancelled (helper-321). So each probe's outcome is counted too
(``innfer_pending_probes_total{outcome}``: answered, cancelled, failed) and cancelled
probes are logged (``cancelled``). The share cancelled is the share of time the queue was
full: under steady arrivals about the share of clients' calls gRPC cancelled (which
nothing else counts: 42.0 / 42.3 % calls / probes), but a probe every 50 ms seldom lands
in a burst's few full milliseconds (helper-322: 128 calls at once every second, 45.9 % of
calls cancelled against 0.3 % of probes). A probe that keeps failing otherwise (no
connection, one closed under it, a 60 s timeout) is said once at WARNING.

And where no one watches the metrics (``innfer serve`` in a terminal), a backlog is said in
the log: probes that each waited over ``BACKLOG_S``, at least ``BACKLOG_PROBES`` in a row
and for ``BACKLOG_FOR_S`` (one stall of the loop is no backlog), log a WARNING naming the
wait and what to do, at most once a ``BACKLOG_LOG_S``.

Example:
    >>> import asyncio
    >>> seen = []
    >>> class Details:  # what gRPC hands a generic handler
    ...     method = METHOD
    >>> answer = PendingProbe(seen.append).handler().service(Details()).unary_unary
    >>> asyncio.run(answer(b"not the process's token", None)), seen  # no sample
    (b'', [])
"""

from __future__ import annotations

import collections
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable

import grpc

log = logging.getLogger("innfer.pending")

PERIOD_S = 0.05  # between one probe's end and the next send
METHOD = "/innfer.internal.Pending/Probe"  # not OIP; a generic method (gRPC's shared queue)
TIMEOUT_S = 60.0  # a probe unanswered this long is given up (a loop stopped that long)
RETRY_S = 1.0  # after a probe that failed otherwise than cancelled (no connection)
WARN_AFTER = 10  # failures in a row before the probe says so at WARNING
BACKLOG_S = 0.05  # a probe that waited longer found a backlog ...
BACKLOG_PROBES = 3  # ... and this many in a row ...
BACKLOG_FOR_S = 1.0  # ... from the first one's send on, this long, are logged ...
BACKLOG_LOG_S = 300.0  # ... at most once in this long (cancelled probes' log too)
CANCELLED_PROBES = 3  # probes cancelled ...
CANCELLED_WITHIN_S = 10.0  # ... within this long are logged
_STAMP = struct.Struct("<d")  # the send time: this process's time.monotonic()


class PendingProbe:
    """A daemon thread that calls ``METHOD`` on the server every ``PERIOD_S`` until
    ``stop``; ``handler`` (added to the server before it starts) answers it and passes
    ``observe`` each probe's wait in seconds, on the server's event loop. ``outcome``, if
    given, is called from the thread with each probe's end: "answered", "cancelled" (gRPC's
    queue was full) or "failed" (anything else).

    Example:
        >>> probe = PendingProbe(histogram.observe, count.inc)  # doctest: +SKIP
        >>> server.add_generic_rpc_handlers((probe.handler(),))  # doctest: +SKIP
        >>> probe.start("127.0.0.1:8001")  # once the server has started  # doctest: +SKIP
    """

    def __init__(
        self, observe: Callable[[float], None], outcome: Callable[[str], None] | None = None
    ) -> None:
        self._observe = observe
        self._outcome = outcome or (lambda _: None)
        self._token = os.urandom(16)
        self._stop = threading.Event()
        self._long = 0  # probes in a row that waited over BACKLOG_S
        self._since = 0.0  # the first one's send (time.monotonic)
        self._said = -math.inf  # when a backlog was last logged
        self._cancels: collections.deque[float] = collections.deque()  # recent, in the thread
        self._said_cancels = -math.inf

    def observed(self, wait_s: float, now: float) -> None:
        """One probe's wait (seconds), reached at ``now`` (time.monotonic): to ``observe``,
        and logged where it ends a backlog's first ``BACKLOG_FOR_S`` (module doc).

        Example:
            >>> waits = []
            >>> PendingProbe(waits.append).observed(0.004, now=1.0)  # short: observed only
            >>> waits
            [0.004]
        """
        self._observe(wait_s)
        if wait_s <= BACKLOG_S:
            self._long = 0
            return
        if self._long == 0:
            self._since = now - wait_s
        self._long += 1
        lasted = now - self._since
        if self._long < BACKLOG_PROBES or lasted < BACKLOG_FOR_S:
            return
        if now - self._said >= BACKLOG_LOG_S:
            self._said = now
            log.warning(
                "calls wait %.0f ms in gRPC's queue before the server takes them up (over "
                "%.0f ms for %.1f s): request handling is slower than calls come, and budgets "
                "run out there unseen. Add replicas or CPU, or set max_pending_calls in the "
                "server config (beyond it gRPC cancels new calls at once); "
                "innfer_pending_wait_seconds tracks it",
                1e3 * wait_s, 1e3 * BACKLOG_S, lasted,
            )  # fmt: skip

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of ``METHOD``: raw bytes in (token + stamp), none out."""
        token = self._token

        async def probe(body: bytes, context) -> bytes:
            now = time.monotonic()
            if len(body) == len(token) + _STAMP.size and body[: len(token)] == token:
                self.observed(max(0.0, now - _STAMP.unpack_from(body, len(token))[0]), now)
            return b""

        service, _, name = METHOD[1:].rpartition("/")
        handlers = {name: grpc.unary_unary_rpc_method_handler(probe)}
        return grpc.method_handlers_generic_handler(service, handlers)

    def cancelled(self, now: float) -> None:
        """A probe cancelled at ``now`` (gRPC's queue was full at ``max_pending_calls``):
        logged where ``CANCELLED_PROBES`` came within ``CANCELLED_WITHIN_S`` - under the
        bound answered probes wait little, so the backlog warning stays silent while calls
        are cancelled (helper-322: 46 % of them at 16, nothing logged).

        Example:
            >>> p = PendingProbe(lambda wait_s: None)
            >>> p.cancelled(1.0)  # one alone: not logged
        """
        self._cancels.append(now)
        while self._cancels and now - self._cancels[0] > CANCELLED_WITHIN_S:
            self._cancels.popleft()
        if len(self._cancels) < CANCELLED_PROBES or now - self._said_cancels < BACKLOG_LOG_S:
            return
        self._said_cancels = now
        log.warning(
            "gRPC cancels calls its queue has no room for (max_pending_calls; gRPC's own "
            "1,000 where null): %d of the server's own probe calls "
            "in %.0f s found it full (innfer_pending_probes_total counts them; no "
            "metric counts the clients' cancelled calls). Request handling is slower than "
            "calls come, or clients send bursts larger than the bound: add replicas or "
            "CPU, or raise max_pending_calls for bursty clients",
            len(self._cancels), CANCELLED_WITHIN_S,
        )  # fmt: skip

    def start(self, address: str) -> None:
        threading.Thread(
            target=self._run, args=(address,), name="innfer-pending-probe", daemon=True
        ).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, address: str) -> None:
        # A connection of its own (a local subchannel pool), never one a client shares.
        options = [("grpc.use_local_subchannel_pool", 1)]
        failures = 0  # in a row, other than cancelled
        with grpc.insecure_channel(address, options=options) as channel:
            call = channel.unary_unary(METHOD)
            while not self._stop.is_set():
                try:
                    call(self._token + _STAMP.pack(time.monotonic()), timeout=TIMEOUT_S)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.CANCELLED:  # the queue was full
                        self._outcome("cancelled")
                        self.cancelled(time.monotonic())
                        self._stop.wait(PERIOD_S)
                        continue
                    self._outcome("failed")
                    failures += 1
                    if failures == WARN_AFTER and not self._stop.is_set():
                        log.warning("the pending-queue probe cannot reach %s (%s: %s); "
                                    "innfer_pending_wait_seconds gets no samples",
                                    address, exc.code().name, exc.details())  # fmt: skip
                    self._stop.wait(RETRY_S)
                    continue
                if failures >= WARN_AFTER:
                    log.warning("the pending-queue probe reaches %s again", address)
                failures = 0
                self._outcome("answered")
                self._stop.wait(PERIOD_S)

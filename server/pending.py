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
token. Cost: one small call per period, ~0.1 ms of the loop's time a second at 20 Hz.

Under ``max_pending_calls`` a full queue cancels the probe with the inference calls, and a
probe that gets in finds the queue short: the histogram alone then read a calm p99 while
40 % of the calls were cancelled (helper-321). So each probe's outcome is counted too
(``innfer_pending_probes_total{outcome}``: answered, cancelled, failed): the share
cancelled is about the share of clients' calls gRPC cancelled, which nothing else counts.
A probe that keeps failing otherwise (its address unreachable) is said once at WARNING.

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

import logging
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

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of ``METHOD``: raw bytes in (token + stamp), none out."""
        token, observe = self._token, self._observe

        async def probe(body: bytes, context) -> bytes:
            now = time.monotonic()
            if len(body) == len(token) + _STAMP.size and body[: len(token)] == token:
                observe(max(0.0, now - _STAMP.unpack_from(body, len(token))[0]))
            return b""

        service, _, name = METHOD[1:].rpartition("/")
        handlers = {name: grpc.unary_unary_rpc_method_handler(probe)}
        return grpc.method_handlers_generic_handler(service, handlers)

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

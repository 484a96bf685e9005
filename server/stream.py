"""Serving one bidirectional stream of requests (Triton's ModelStreamInfer), transport-free.

Requests on a stream run concurrently; their answers are written in the order the requests
were read (``ordered``, the default: Triton answers a non-decoupled model's stream in request
order, and clients written for it pair answers with requests by position), or each as soon
as it completes (``ordered=False``: for clients that match answers by id, so that a fast or
urgent request's answer is not held behind a slower one). The stream is bounded: at most
``limit`` requests are in flight - read and not yet written back - and no further message
is read until one is written - nor while the stream's ``StreamWindow`` of bytes is full - so
a client that sends faster than the server answers, or reads slower, is slowed by gRPC's
flow control instead of growing the server's memory. When the stream
ends - the client half-closes, is cancelled or goes away - every request still running is
cancelled (the scheduler drops it from the queue); after a half-close the requests already
read are answered first.

Example:
    >>> async def demo():
    ...     async def requests():
    ...         for i in (3, 1, 2):
    ...             yield i
    ...     async def answer(i):
    ...         await asyncio.sleep(i / 100)
    ...         return i
    ...     out = []
    ...     async def write(x):
    ...         out.append(x)
    ...     await serve_stream(requests(), answer, write, limit=8)
    ...     await serve_stream(requests(), answer, write, limit=8, ordered=False)
    ...     return out
    >>> asyncio.run(demo())
    [3, 1, 2, 1, 2, 3]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TypeVar

# Requests of one stream read and not yet answered. Enough to keep a model's batches full
# from one client (max_batch is typically 8-64); beyond it the stream waits.
MAX_STREAM_INFLIGHT = 64

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class StreamPool:
    """What all of a server's streams hold together, and its limit: from it on, a stream that
    already holds bytes reads nothing more (``StreamWindow``), so that many streams that do
    not read leave the rest of the in-flight cap to unary calls and to streams holding
    nothing.

    Example:
        >>> pool = StreamPool(1500)
        >>> pool.add(1600); pool.full
        True
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.waiters: set[asyncio.Event] = set()  # streams waiting for it to have room

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def add(self, nbytes: int) -> None:
        self.held += nbytes

    def sub(self, nbytes: int) -> None:
        was_full = self.held >= self.limit
        self.held -= nbytes
        # Streams wait only while it is full: woken as it stops being so, once each (each
        # re-checks, and charges its advance before it goes on).
        if was_full and self.waiters and self.held < self.limit:
            for event in self.waiters:
                event.set()


# How much later than the stream's fixed deadline a request's own reading of it may be and
# still be that deadline (``StreamWindow.deadline_at``): readings differ by the microseconds
# between the deadline's read and the clock's; gRPC's rounding steps are 10 ms and more.
DEADLINE_JUMP_S = 5e-4


class StreamWindow:
    """The bytes one stream holds of the server's in-flight cap - its requests being answered
    and the answers its client has not read yet - and when the stream may start the next
    request (``serve_stream(..., window=)``): as HTTP/2's flow-control window, but in bytes
    the server holds rather than bytes on the wire.

    Two bounds, both of which only delay (a stream holding nothing always goes on, however
    large its request; the server's cap alone refuses):
      - its own ``limit``: a client that sends without reading stalls its own stream there
        (gRPC's flow control then slows its sends) instead of filling the server's cap, at
        which every client is refused;
      - the ``pool``'s, what all streams hold together: many streams that do not read stall
        at it, not at the cap.
    A request's answer bytes are charged once it is decoded - for a text, after it waits for
    the tokenizer threads - so ``room`` charges an advance on them (the largest single charge
    seen) as it lets a request through, given back when they are (``charged``) or the request
    ends (``settle``): streams woken together do not all pass on the same free bytes, nor
    does one stream start 64 texts on what their requests alone hold. Until one request of
    the stream has had its answer charged the size is unknown, and one request at a time is
    let through.

    Invariant: ``held`` (and the pool's) is the sum of ``add``s less ``sub``s; every request
    ``begin`` noted is in ``_pending`` until ``charged`` or ``settle``.

    Example:
        >>> pool = StreamPool(1500)
        >>> a, b = StreamWindow(1000, pool), StreamWindow(1000, pool)
        >>> a.add(800); b.add(800); a.may_read(), b.may_read()
        (False, False)
        >>> b.sub(800); a.may_read(), b.may_read()
        (True, True)
        >>> a.add(300); a.may_read()  # its own limit
        False
    """

    def __init__(
        self, limit: int, pool: StreamPool | None = None,
        stalled: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.limit = limit
        self.held = 0
        self.pool = pool
        self.largest = 0  # the largest single charge: the estimate of a request's
        self.learned = False  # whether a request's answer was charged on this stream
        self._stalled = stalled  # called with "window" or "share" when reading stops at it
        self._wake = asyncio.Event()
        # Requests started whose answer bytes are not charged yet -> the advance on them.
        self._pending: dict[object, int] = {}
        self._deadline_at: dict[str, float] = {}  # model -> the stream's deadline, its clock

    def deadline_at(self, model: str, now: float, time_remaining: float) -> float:
        """The stream's deadline on ``model``'s clock: ``now + time_remaining`` as its first
        request there read it, the same value for every later one. Each request's own
        reading differed by microseconds, which decided their order in the queue (the
        earliest deadline first): a stream's requests ran in close to random order. A
        reading later by more than ``DEADLINE_JUMP_S`` is taken instead: within the stream's
        last rounding step ``service.deadline_left`` stops taking the step off.

        Example:
            >>> w = StreamWindow(1000)
            >>> w.deadline_at("m", 10.0, 2.0), w.deadline_at("m", 10.5, 1.4999)
            (12.0, 12.0)
            >>> w.deadline_at("m", 11.95, 0.15)  # the last 100 ms step: not taken off
            12.1
        """
        at = now + time_remaining
        fixed = self._deadline_at.get(model)
        if fixed is None or at > fixed + DEADLINE_JUMP_S:
            self._deadline_at[model] = fixed = at
        return fixed

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        if self.pool is not None:
            self.pool.add(nbytes)
        self.largest = max(self.largest, nbytes)

    def sub(self, nbytes: int) -> None:
        self.held -= nbytes
        if self.pool is not None:
            self.pool.sub(nbytes)
        self._wake.set()

    def may_read(self) -> bool:
        return self._bound() is None

    def _bound(self) -> str | None:
        """What holds the stream's next request back: "learning" (a request's answer size
        is not known yet), "window", "share", or None."""
        if not self.learned and self._pending:
            return "learning"
        if not self.held:
            return None
        if self.held >= self.limit:
            return "window"
        if self.pool is not None and self.pool.full:
            return "share"
        return None

    def begin(self, key: object, advance: int) -> None:
        """Note the request ``key`` started with ``advance`` bytes charged by ``room``."""
        self._pending[key] = advance

    def charged(self, key: object) -> None:
        """The request ``key``'s answer bytes are charged: its advance goes back."""
        self.learned = True
        self.settle(key)

    def settle(self, key: object) -> None:
        """The request ``key`` is charged or has ended (whichever comes first; the second
        finds nothing): its advance goes back."""
        advance = self._pending.pop(key, None)
        if advance:
            self.sub(advance)
        elif advance == 0:
            self._wake.set()

    async def room(self) -> int:
        """Return once the stream may go on with the request it read, having charged an
        advance on the bytes that will hold (returned: the caller ``begin``s the request
        with it)."""
        counted = False
        while (bound := self._bound()) is not None:
            if bound != "learning" and not counted and self._stalled is not None:
                self._stalled(bound)
                counted = True
            self._wake.clear()
            # Held by the pool, it is woken when that has room (else each of the pool's
            # releases would wake every stalled stream); else by its own releases.
            pooled = bound == "share"
            if pooled:
                self.pool.waiters.add(self._wake)
            try:
                await self._wake.wait()
            finally:
                if pooled:
                    self.pool.waiters.discard(self._wake)
        advance = self.largest if self.held else 0  # alone, it goes on whatever it holds
        self.add(advance)
        return advance


async def serve_stream(
    requests: AsyncIterable[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    write: Callable[[Resp], Awaitable[None]],
    limit: int = MAX_STREAM_INFLIGHT,
    closing: asyncio.Event | None = None,
    ordered: bool = True,
    discard: Callable[[Resp], None] | None = None,
    window: StreamWindow | None = None,
) -> bool:
    """Read ``requests``, run ``answer`` on each concurrently and ``write`` the results in
    the order the requests were read (``ordered``) or each as it completes, with at most
    ``limit`` requests between being read and being written (in order, a request answered
    early keeps its slot until the answers before it are written).

    When ``closing`` is set (the server drains), no further message is read; the requests
    already read are answered and written, and it returns True (else False once the requests
    are exhausted): an idle stream would otherwise hold a server's shutdown for its whole
    grace period, waiting for a client that has nothing to send.

    ``answer`` must turn every error of its request into a response: an exception out of it
    (like one out of reading or writing) ends the whole stream, cancelling the others.
    Returns when the requests are exhausted and every answer is written; on cancellation
    (the client went away) or an error, cancels whatever is still running and waits for it
    to unwind before returning or raising. ``discard`` is called with each answer that was
    made but never handed to ``write`` (the stream ended first): every answer goes to
    exactly one of the two, so what an answer holds can be let go in one or the other.
    ``window``: while it says so (``StreamWindow.room``) no request is started and, past
    the one read, none is read (``answer`` and ``write`` add to and take from it).
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(limit)
    # Completed tasks (answers and the reader) not yet looked at. Not an asyncio.Queue: an
    # answer written in order behind the one before it is taken out of it there, or it
    # kept its response alive until the loop came back for it - never, while a slow
    # reader kept the next answer ready at each write (1 GiB after 1,866 answers of
    # 256 KiB, outside every cap: review 167).
    finished: collections.deque[asyncio.Task] = collections.deque()
    arrived = asyncio.Event()
    running: set[asyncio.Task] = set()
    queue: collections.deque[asyncio.Task] = collections.deque()  # read order, unwritten
    incoming = aiter(requests)

    async def read() -> None:
        while True:
            await slots.acquire()  # before reading: the bound includes the next message
            try:
                message = await anext(incoming)
            except StopAsyncIteration:
                slots.release()
                return
            # The window is checked with the message read (one a stream, as gRPC buffers it
            # anyway): a check before the read would charge a stream that waits there for its
            # client's next message, for as long as the client sends nothing.
            try:
                advance = await window.room() if window is not None else 0
            except asyncio.CancelledError:
                # Draining: answered as the requests read before it are (charging nothing)
                # - unless the stream itself is ending: nothing started then is unwound.
                if closed is not None and closed.done() and not ending:
                    start(message, 0)
                raise
            start(message, advance)
            if window is not None:
                # Let the answer's first step run before the next read is decided: it charges
                # its request's bytes (with nothing held, no advance is charged for it).
                await asyncio.sleep(0)

    def completed(task: asyncio.Task) -> None:
        finished.append(task)
        arrived.set()

    def start(message: Req, advance: int) -> None:
        task = loop.create_task(answer(message))
        running.add(task)
        if ordered:
            queue.append(task)
        task.add_done_callback(completed)
        if window is not None:  # until its answer is charged (``charged``), or it ends
            window.begin(task, advance)
            task.add_done_callback(window.settle)

    reader = loop.create_task(read())
    reader.add_done_callback(completed)
    closed = loop.create_task(closing.wait()) if closing is not None else None
    if closed is not None:
        closed.add_done_callback(lambda _: reader.cancel())
    cut = False  # reading stopped by ``closing``, not by the client's half-close
    ending = False  # the stream is being unwound: the reader starts nothing more
    try:
        reading = True
        while reading or running:
            while not finished:
                arrived.clear()
                await arrived.wait()
            task = finished.popleft()
            if task is reader:
                reading = False
                cut = task.cancelled() and closed is not None and closed.done()
                if not cut:
                    task.result()  # a read error ends the stream
                continue
            if task not in running:
                continue  # written already: in order, right after an answer before it
            if ordered:
                if task is not queue[0]:
                    continue  # written when the answers read before it are
                queue.popleft()
            while True:
                running.discard(task)
                try:
                    await write(task.result())
                finally:
                    slots.release()
                # In order: the answers behind it that completed meanwhile go out now (their
                # own completions find them written).
                if not (ordered and queue and queue[0].done()):
                    break
                task = queue.popleft()
                # (its completion's callback may not have run yet: then the loop skips it,
                # written, when it comes)
                with contextlib.suppress(ValueError):
                    finished.remove(task)
    finally:
        ending = True
        reader.cancel()
        if closed is not None:
            closed.cancel()
        for task in running:  # answered or not, never to be written
            task.cancel()
            if discard is not None:  # by callback: the gather below may itself be cancelled
                task.add_done_callback(functools.partial(_discard, discard))  # (gRPC does)
        # Let the cancelled requests leave the scheduler's queue before the stream ends.
        await asyncio.gather(reader, *running, return_exceptions=True)
    return cut


def _discard(discard: Callable[[Resp], None], task: asyncio.Task) -> None:
    """``discard`` the answer ``task`` made, if it made one."""
    if not task.cancelled() and task.exception() is None:
        discard(task.result())

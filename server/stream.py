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
import functools
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TypeVar

# Requests of one stream read and not yet answered. Enough to keep a model's batches full
# from one client (max_batch is typically 8-64); beyond it the stream waits.
MAX_STREAM_INFLIGHT = 64

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class StreamWindow:
    """The bytes one stream holds of the server's in-flight cap - its requests being answered
    and the answers its client has not read yet - and the bound on them at which the stream
    reads no further request (``serve_stream(..., window=)``): as HTTP/2's flow-control
    window, but in bytes the server holds rather than bytes on the wire.

    Counted by the model's count, not 64 per stream: a client that sends without reading
    stalls its own stream at ``limit`` bytes (gRPC's flow control then slows its sends)
    instead of filling the server's cap, at which every client is refused. The bound only
    delays: a stream holding nothing always reads its next request, however large.

    Invariant: ``held`` is the sum of ``add``s less ``sub``s; reading is open exactly while
    ``held < limit``.

    Example:
        >>> w = StreamWindow(1000)
        >>> w.add(1200); w.open
        False
        >>> w.sub(1200); w.open, w.held
        (True, 0)
    """

    def __init__(self, limit: int, stalled: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self._stalled = stalled  # called each time the stream stops reading at its bound
        self._open = asyncio.Event()
        self._open.set()

    @property
    def open(self) -> bool:
        return self._open.is_set()

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        if self.held >= self.limit:
            self._open.clear()

    def sub(self, nbytes: int) -> None:
        self.held -= nbytes
        if self.held < self.limit:
            self._open.set()

    async def room(self) -> None:
        """Return once the stream holds less than its bound."""
        if self._open.is_set():
            return
        if self._stalled is not None:
            self._stalled()
        await self._open.wait()


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
    ``window``: no further message is read while it is closed (``answer`` and ``write``
    add to and take from it).
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(limit)
    finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
    running: set[asyncio.Task] = set()
    queue: collections.deque[asyncio.Task] = collections.deque()  # read order, unwritten
    incoming = aiter(requests)

    async def read() -> None:
        while True:
            await slots.acquire()  # before reading: the bound includes the next message
            if window is not None:
                await window.room()
            try:
                message = await anext(incoming)
            except StopAsyncIteration:
                slots.release()
                return
            task = loop.create_task(answer(message))
            running.add(task)
            if ordered:
                queue.append(task)
            task.add_done_callback(finished.put_nowait)
            if window is not None:
                # The answer's first step holds its request's bytes: let it run before the
                # next read is decided, or messages the transport has buffered would all be
                # read on an open window.
                await asyncio.sleep(0)

    reader = loop.create_task(read())
    reader.add_done_callback(finished.put_nowait)
    closed = loop.create_task(closing.wait()) if closing is not None else None
    if closed is not None:
        closed.add_done_callback(lambda _: reader.cancel())
    cut = False  # reading stopped by ``closing``, not by the client's half-close
    try:
        reading = True
        while reading or running:
            task = await finished.get()
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
    finally:
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

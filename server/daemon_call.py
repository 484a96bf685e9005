"""Blocking file-system calls that must not hold the process's exit.

asyncio's default executor (and every ``concurrent.futures`` pool) joins its threads when
the interpreter exits: ``asyncio.run`` waits in ``shutdown_default_executor``, then
``concurrent.futures`` at exit. A ``stat`` of a stalled NFS volume sleeps in the kernel
until the server answers - for ever, on a hard mount - so one such call made through the
executor held a SIGTERM'd server past its grace period until the kubelet killed it. The
periodic looks at the repository and at the secrets' files run here instead (a daemon
thread per call), and auto-tiering's work on the shared volume on a ``DaemonWorker``: the
exit waits for neither. (A model's load still reads its files on the default executor: a
load, an engine build among them, is finished before the exit, as the start-up promises.)

Example:
    >>> import asyncio, os
    >>> asyncio.run(in_daemon_thread(os.path.isdir, "/"))
    True
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("innfer.daemon_call")


async def in_daemon_thread(fn: Callable[..., T], *args, name: str = "innfer-io") -> T:
    """``fn(*args)`` in a daemon thread of its own, awaited. Cancelling the caller returns
    at once; ``fn`` runs on (its result is dropped) and never holds the exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result, exc) -> None:  # on the loop
        if done.done():  # the caller was cancelled meanwhile
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as error:  # handed to the caller, as an executor would
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed while fn ran: no one
            loop.call_soon_threadsafe(settle, result, exc)  # waits for it

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


class DaemonWorker:
    """One daemon thread that runs the calls given to ``submit`` in order: what a
    ``ThreadPoolExecutor(1)`` does, but a call stuck on a stalled volume does not hold the
    exit (``concurrent.futures`` joins its pools' threads at exit, whatever
    ``shutdown(wait=False)`` said). Started at the first ``submit``.

    Example:
        >>> worker = DaemonWorker("innfer-files")
        >>> worker.submit(sum, [1, 2]).result()
        3
        >>> worker.shutdown()
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., T], *args) -> concurrent.futures.Future:
        """``fn(*args)`` after every call submitted before it; RuntimeError once shut down
        (as an executor's)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot take calls after shutdown")
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._queue.put((future, fn, args))
            if self._thread is None:  # (kept only once started: a failed start is retried)
                thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                thread.start()
                self._thread = thread
        return future

    def shutdown(self, wait: bool = False) -> None:
        """Take no more calls; those submitted still run, then the thread ends (``wait``:
        accepted for the executor's signature; never waited for)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, as an executor would
                _settle(future.set_exception, exc)
            else:
                _settle(future.set_result, result)


def _settle(set_outcome: Callable, value) -> None:
    """Settle a future; a done-callback that raises (past the Exception concurrent.futures
    swallows: SystemExit, KeyboardInterrupt) is logged, not left to end the worker - every
    later call would hang (review 212)."""
    try:
        set_outcome(value)
    except BaseException:
        log.exception("a done-callback of a DaemonWorker call raised; the worker goes on")

"""Blocking file-system calls that must not hold the process's exit.

asyncio's default executor (and every ``concurrent.futures`` pool) joins its threads when
the interpreter exits: ``asyncio.run`` waits in ``shutdown_default_executor``, then
``concurrent.futures`` at exit. A ``stat`` of a stalled NFS volume sleeps in the kernel
until the server answers - for ever, on a hard mount - so one such call made through the
executor held a SIGTERM'd server past its grace period until the kubelet killed it. The
periodic looks at the repository and at the secrets' files run here instead: a daemon
thread per call, which the exit does not wait for.

Example:
    >>> import asyncio, os
    >>> asyncio.run(in_daemon_thread(os.path.isdir, "/"))
    True
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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

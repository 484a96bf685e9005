"""Thread priority: lowering a thread's nice value, and running work on a lowered thread so
that the threads it makes start lowered too.

On Linux a thread is a task of its own, with its own nice value, and a thread it makes
starts with that value. The server lowers the threads that call CPU engines below request
handling (``ServerConfig.engine_nice``, server/engine_threads.py); ONNX Runtime makes its
intra-op pool threads (``threads: 2`` and up) when a session is made, so a session made on
a lowered thread has its pool lowered as well (runtime/engines/onnxruntime.py).

An unprivileged process cannot raise a nice value again, which is why the work runs on a
thread of its own that ends with it rather than on a shared pool's thread.

Example:
    >>> run_lowered(lambda: 6 * 7, 0, "demo")
    42
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("innfer.priority")

MAX_NICE = 19  # the kernel's lowest priority
T = TypeVar("T")


def lower_priority(by: int, name: str) -> int | None:
    """Add ``by`` to the calling thread's nice value (at most ``MAX_NICE``), relative, so a
    server started under ``nice`` keeps its engines below its own handling; the new value,
    or None off Linux (no per-thread nice value: ``setpriority`` with a thread id would name
    a process) or where the kernel refused it (logged: the engines then run at the loop's
    priority).

    Example:
        >>> got = []
        >>> t = threading.Thread(target=lambda: got.append(lower_priority(0, "demo")))
        >>> t.start(); t.join(); got[0] == os.getpriority(os.PRIO_PROCESS, 0)
        True
    """
    if not sys.platform.startswith("linux"):  # (elsewhere the call would name a process)
        return None
    tid = threading.get_native_id()
    try:
        value = min(os.getpriority(os.PRIO_PROCESS, tid) + by, MAX_NICE)
        os.setpriority(os.PRIO_PROCESS, tid, value)
    except OSError as exc:
        log.warning("%s: engine thread priority not lowered (%s); it runs at the "
                    "priority of request handling", name, exc)  # fmt: skip
        return None
    return value


def run_lowered(fn: Callable[[], T], by: int, name: str) -> T:
    """``fn()`` on a new thread ``by`` nice levels below the caller's (``lower_priority``),
    its result returned or its exception raised here; the threads ``fn`` makes start at
    the lowered value. ``by`` 0: ``fn()`` on the calling thread.

    Example:
        >>> run_lowered(lambda: threading.current_thread().name, 3, "demo")
        'demo'
    """
    if by <= 0:
        return fn()
    box: dict = {}

    def work() -> None:
        lower_priority(by, name)
        try:
            box["value"] = fn()
        except BaseException as exc:  # raised again on the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box.pop("error")
    return box["value"]

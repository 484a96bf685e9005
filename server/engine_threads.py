"""Engine threads: the threads a model's batches run on, off the event loop, and their
priority.

Where engine threads and request handling share CPU cores (a pod with a one-CPU limit, a
server pinned to one core), the kernel splits a core between them while both can run, and
on a single core the split decides the batch sizes: a batch starts as soon as the engine is
free, holding what the event loop had taken in while the previous one ran - with an equal
share, what it could parse in half of that run. Measured on the MLP of issue 14 (784-2048-
2048-10, ONNX Runtime 1 thread, server pinned to one core, 8 closed-loop clients), one
server config apart in A/B runs: batches of 1.6-2.4 rows and 742-783 requests/s at equal
priority; with the engine thread 5 nice levels below the loop - about a quarter of the
core while the loop has work, all of it once the loop waits - the loop first takes in what
arrived, each batch holds all of it (3.6-3.7 rows), the engine's cost per row falls, and
1,009-1,110 requests/s, p50 7.0-7.6 ms against 10.0-10.9. bench/peers.py, 3 repeats in one
run: 1,030 vs 779 requests/s (1.32-1.37x per repeat), batches 3.4 vs 1.8. With spare cores
nothing changes: each thread has its own.

What is lowered: the thread that calls the engine, and ONNX Runtime's intra-op pool
threads (``threads: 2`` and up), which the session makes at load: the data plane passes
``engine_nice`` to the load, and the session is made on a lowered thread whose threads
start lowered (runtime/priority.py). With ``threads: 1`` (the default) the calling thread is
the whole engine. Only engines that compute on the host CPU are lowered
(``ServerConfig.engine_nice``); a GPU engine's thread mostly launches kernels and waits, and
a delay there idles the GPU. Linux only (a thread is a task of its own there, with its own
nice value, and the threads it makes start with it).

Example:
    >>> threads, out = EngineThreads(1, "demo", nice=5), []
    >>> threads.submit(out.append, 1)
    >>> threads.shutdown(); threads.join(); out
    [1]
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from runtime.priority import MAX_NICE, lower_priority

__all__ = ["MAX_NICE", "EngineThreads", "lower_priority"]

log = logging.getLogger("innfer.engine_threads")


class EngineThreads:
    """A model's engine threads: at most ``n``, started by the first batch, each running the
    calls ``submit`` hands it in order. Daemon threads, unlike ``concurrent.futures``' (which
    the interpreter joins at exit): one stuck in an engine call - a hung GPU - must not keep
    a server that was told to stop from exiting.

    Example:
        >>> threads, out = EngineThreads(2, "demo"), []
        >>> threads.submit(out.append, 1)
        >>> threads.shutdown(); threads.join(); out
        [1]
    """

    def __init__(self, n: int, name: str, nice: int = 0) -> None:
        self.n = n
        self.name = name
        self.nice = nice  # added to each thread's nice value when it starts (``lower_priority``)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # submit (the loop) and shutdown (a closing thread)
        self._shut = False

    def submit(self, fn: Callable, *args) -> None:
        with self._lock:
            if self._shut:
                raise RuntimeError(f"{self.name}: engine threads already shut down")
            if not self._threads:
                for i in range(self.n):
                    t = threading.Thread(target=self._work, name=f"{self.name}_{i}", daemon=True)
                    t.start()
                    self._threads.append(t)
            self._calls.put((fn, args))

    def _work(self) -> None:
        if self.nice:
            lower_priority(self.nice, self.name)
        while (call := self._calls.get()) is not None:
            fn, args = call
            try:
                fn(*args)
            except Exception:  # e.g. the loop closed under a batch that outlived the server
                log.exception("%s: a batch's hand-off failed", self.name)
            # Not held while idle: an idle thread kept its last batch's inputs (outside the
            # in-flight cap) and a tokenizer thread an unloaded model's whole runtime alive
            # until its next call (review helper-133).
            del call, fn, args

    def shutdown(self) -> None:
        """No more calls; each thread ends after the calls already submitted."""
        with self._lock:
            self._shut = True
            for _ in self._threads:
                self._calls.put(None)

    def join(self) -> None:
        """Wait until every thread ended (``shutdown`` first)."""
        for t in self._threads:
            t.join()

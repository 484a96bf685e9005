"""The garbage collector's CPU time per thread: what a run on the event loop spent in a
collection it happened to trigger, not in its own work.

A batch run on the loop thread (``ModelRuntime._may_run_inline``) that takes far past its
plan takes its tier off the loop for good (``_check_inline``); a gen-2 collection inside
that run - 53 ms of the loop thread's CPU on a server with torch loaded - did so after one
run in 2,300 of a 1 ms MLP, and every later request paid two thread hand-offs (session 72).
The collection is the process's, not the tier's: it is taken off before the run is judged.

``gc.callbacks`` calls ``_on_gc`` on the collecting thread, with the GIL held, at the start
and the stop of every collection; the per-thread totals only grow.

Example:
    >>> import gc
    >>> before = gc_cpu_s()
    >>> _ = gc.collect()
    >>> gc_cpu_s() >= before
    True
"""

from __future__ import annotations

import gc
import threading
import time

_started: dict[int, float] = {}  # thread -> its CPU time when its collection began
_total: dict[int, float] = {}  # thread -> CPU seconds spent collecting, so far


def _on_gc(phase: str, info: dict) -> None:
    me = threading.get_ident()
    if phase == "start":
        _started[me] = time.thread_time()
    elif (t0 := _started.pop(me, None)) is not None:
        _total[me] = _total.get(me, 0.0) + time.thread_time() - t0


def gc_cpu_s() -> float:
    """This thread's CPU seconds in garbage collections since the module was imported."""
    return _total.get(threading.get_ident(), 0.0)


if _on_gc not in gc.callbacks:
    gc.callbacks.insert(0, _on_gc)  # first: the others' time counts as the collection's

"""Whether the event loop has had nothing to do: a count of the times it waited for I/O.

The data plane runs a short batch on the loop thread (``ModelRuntime._may_run_inline``)
only at light load, and "light" cannot be read from the requests the server has parsed:
while the loop runs a batch, the next requests wait in gRPC's queue where no Python code
sees them, so a saturated server still finds one request in flight at a time, runs it
inline, and never forms a batch (the MLP at 8 closed-loop clients: 87 % of batches of one,
654 req/s; without inline runs 808 req/s). What tells light load apart is whether the loop
went idle: with work pending in gRPC it never waits for I/O.

``idle_watch(loop)`` wraps the loop's selector once (asyncio's selector event loops, the
default on Linux): a ``select`` that would block first polls; only when nothing is ready
does it count a wait and block. A loop without a selector (uvloop) gets a watch that
always reports idle, which keeps the data plane's previous behaviour.

The same moment runs **deferred work** (``IdleWatch.defer``): bookkeeping that no answer
waits for - a finished batch's latency observation, metrics and statistics - queued while
the answers go out and run when the loop is about to wait (then it polls again: the work
may have taken long enough for the next request to arrive). Whoever reads the state that
work updates calls ``flush`` first (the scheduler before a decision, the statistics RPC,
a model's stop), so no decision or report sees it stale. Without a watched selector the
work runs at once.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     watch = idle_watch(asyncio.get_running_loop())
    ...     before = watch.waits
    ...     await asyncio.sleep(0.001)  # nothing else to run: the loop waits
    ...     return watch.waits > before
    >>> asyncio.run(demo())
    True
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import weakref
from collections.abc import Callable

log = logging.getLogger("innfer.loop_idle")

_WATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class IdleWatch:
    """``waits``: how many times the loop has blocked for I/O; it only grows. Compare two
    readings to learn whether the loop went idle in between. ``turns``: how many times it
    has polled for I/O, once per turn of the loop (two code paths that read the same value
    ran in one turn); counted only where ``counting``."""

    def __init__(self, counting: bool) -> None:
        self.counting = counting  # False: the loop could not be watched; every read differs
        self._waits = 0
        self.turns = 0
        self._ticks = itertools.count(1)
        self._deferred: collections.deque = collections.deque()

    @property
    def waits(self) -> int:
        return self._waits if self.counting else next(self._ticks)

    def waited(self) -> None:
        self._waits += 1

    def defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on this loop's thread when the loop is next about to wait, or
        at the next ``flush``, whichever comes first (at once where the loop is not
        watched). Called in the order deferred."""
        self._deferred.append((fn, args))
        if not self.counting:
            self.flush()  # nothing would run it later; a failure is logged as there

    def flush(self) -> bool:
        """Run the deferred work now; whether there was any. A failure is logged and the
        rest still runs (bookkeeping must not take the loop down)."""
        if not self._deferred:
            return False
        while self._deferred:
            fn, args = self._deferred.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("deferred %s failed", getattr(fn, "__qualname__", fn))
        return True


class _WatchedSelector:
    """A selector that counts, on ``watch``, each ``select`` that had to block. Every other
    attribute is the wrapped selector's."""

    def __init__(self, inner, watch: IdleWatch) -> None:
        self._inner = inner
        self._watch = watch

    def select(self, timeout: float | None = None):
        self._watch.turns += 1
        if timeout is not None and timeout <= 0:  # the loop has callbacks ready: not idle
            return self._inner.select(timeout)
        ready = self._inner.select(0)  # one poll; at load it finds the next request here
        if ready:
            return ready
        # Nothing to do: the loop is idle (counted so even if the deferred work below
        # lasts until the next request is there).
        self._watch.waited()
        if self._watch.flush():
            # Poll, not wait: the work may have scheduled callbacks (a freed device slot
            # wakes other models), which this select's timeout does not know about. With
            # none, the loop comes straight back here and waits.
            return self._inner.select(0)
        return self._inner.select(timeout)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def idle_watch(loop: asyncio.AbstractEventLoop) -> IdleWatch:
    """The loop's watch, installed on first use (one per loop, shared by every model)."""
    watch = _WATCHES.get(loop)
    if watch is None:
        selector = getattr(loop, "_selector", None)
        watch = IdleWatch(counting=selector is not None and hasattr(selector, "select"))
        if watch.counting:
            loop._selector = _WatchedSelector(selector, watch)
        _WATCHES[loop] = watch
    return watch

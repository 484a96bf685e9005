"""At most one log record per key and window: a failing engine or a refusal storm at a
thousand requests a second must not write a thousand lines a second.

The first event of a key is logged at once; later ones within ``window_s`` are counted, and
the next record logged for that key says how many were left out. Pure (the clock is an
argument), so tests script time.
"""

from __future__ import annotations

from collections.abc import Hashable

WINDOW_S = 10.0


class LogThrottle:
    """Whether to log an event now, per key.

    Example:
        >>> t = LogThrottle(window_s=10.0)
        >>> t.allow("m/w100", 0.0), t.allow("m/w100", 1.0), t.allow("m/w100", 2.0)
        (0, None, None)
        >>> t.allow("m/w100", 10.5)  # logged again, with the 2 left out since
        2
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._last: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}

    def allow(self, key: Hashable, now: float) -> int | None:
        """None: do not log (counted); else log, and the int is how many events of ``key``
        were left out since its last record."""
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)

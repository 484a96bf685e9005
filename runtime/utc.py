"""Timestamps the repository's files record: UTC, to the second, ISO 8601 with a ``Z``.

One format for every writer (profile.json, frontier/, the engine cache, auto_tiers.json) and
the one reader that computes with it (auto-tiering's rebuild interval). A stamp written in
local time with a ``Z`` (frontier's, once) read hours off on a machine outside UTC.

Example:
    >>> stamp(0.0)
    '1970-01-01T00:00:00Z'
    >>> seconds("1970-01-01T00:01:40Z")
    100.0
"""

from __future__ import annotations

import calendar
import time

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def stamp(t: float | None = None) -> str:
    """``t`` (seconds since the epoch; None: now) as a UTC stamp."""
    return time.strftime(FORMAT, time.gmtime(t))


def seconds(text: str) -> float:
    """A stamp back to seconds since the epoch. ValueError (TypeError for a non-string)
    where it is not one."""
    return float(calendar.timegm(time.strptime(text, FORMAT)))

"""The order in which a bench runs its arms (servers, trees, implementations).

On this machine the first arm of a pair does worse (bench/live_scheduler.py --repeat), so
no arm may always go first: each repeat, round or point rotates the order by one, and the
bench records the order it used."""

from __future__ import annotations

from collections.abc import Sequence


def rotated(items: Sequence, k: int) -> list:
    """``items`` rotated left by ``k`` (mod their number): k = 0, 1, 2, ... puts each item
    first in turn.

    >>> rotated(["a", "b", "c"], 1)
    ['b', 'c', 'a']
    >>> rotated(["a", "b"], 3)
    ['b', 'a']
    """
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]

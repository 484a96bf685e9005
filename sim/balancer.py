"""The load balancer in front of the replicas: ``least`` outstanding requests (queued +
running; ties go to the next in rotation) or ``round_robin``. It sees only the routable
pods - ready and not terminating - in id order.

Example:
    >>> from types import SimpleNamespace as Pod
    >>> pods = [Pod(id=0, outstanding=3), Pod(id=1, outstanding=1), Pod(id=2, outstanding=1)]
    >>> lb = Balancer("least")
    >>> [lb.pick(pods).id for _ in range(3)]
    [1, 1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

from sim.replica import Replica

BALANCERS = ("least", "round_robin")


class Balancer:
    def __init__(self, kind: str) -> None:
        if kind not in BALANCERS:
            raise ValueError(f"unknown balancer {kind!r}; choose one of {', '.join(BALANCERS)}")
        self.kind = kind
        self._rr = 0

    def pick(self, routable: Sequence[Replica]) -> Replica | None:
        """The pod for the next request; None when there is none to route to."""
        n = len(routable)
        if not n:
            return None
        start = self._rr % n
        self._rr += 1
        if self.kind == "round_robin":
            return routable[start]
        best = routable[start]
        for j in range(1, n):
            rep = routable[(start + j) % n]
            if rep.outstanding < best.outstanding:
                best = rep
        return best

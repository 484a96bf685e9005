"""Pure scheduling policy: no grpc, no torch; the clock is an argument."""

from .latency import LatencyModel, TierInfo
from .policy import (
    POLICIES,
    Context,
    Decision,
    FixedTier,
    Planner,
    Policy,
    SlackFit,
    Snapshot,
    make_policy,
)
from .request import IllegalTransition, Request, State
from .scheduler import InvalidRequest, Refused, Scheduler

__all__ = [
    "POLICIES",
    "Context",
    "Decision",
    "FixedTier",
    "IllegalTransition",
    "InvalidRequest",
    "LatencyModel",
    "Planner",
    "Policy",
    "Refused",
    "Request",
    "Scheduler",
    "SlackFit",
    "Snapshot",
    "State",
    "TierInfo",
    "make_policy",
]

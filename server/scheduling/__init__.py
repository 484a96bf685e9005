"""Pure scheduling policy: no grpc, no torch; the clock is an argument."""

from .latency import DEFAULT_SLO_TARGET, LatencyModel, TierEstimate, TierInfo
from .policy import (
    POLICIES,
    Context,
    Decision,
    FixedTier,
    Planner,
    Policy,
    SlackFit,
    Snapshot,
    best_in_budget,
    make_policy,
    nominal_tier,
)
from .request import IllegalTransition, Request, State
from .scheduler import DEFAULT_ADMIT_QUANTILE, InvalidRequest, Refused, Scheduler

__all__ = [
    "DEFAULT_ADMIT_QUANTILE",
    "DEFAULT_SLO_TARGET",
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
    "TierEstimate",
    "TierInfo",
    "best_in_budget",
    "make_policy",
    "nominal_tier",
]

"""What a live server adds to each request beyond its queue and its batch's compute, as
auto-tiering's choice replays it.

The choice replays recorded traffic through the scheduler on a virtual clock, where an
answer is on time when its batch ends by the deadline. Live, a client's budget also covers
the time the server spends outside queue and compute - receiving and parsing the request,
the hop back from the engine thread, encoding and sending (``server.overhead``; for a
600 KB image on one shared core 1.6 ms at the median and 6-7 ms at p99 in
bench/auto_tiers_live.py's tight phase) - and engines run at the speed the serving machine
has now, not the frontier's quiet-machine times (there, 1.7x their profile: the engine
thread shares the core with request handling). Without both, the choice judged a shifted
load at 100 % within budget that the live server answered 86-90 % of, and it picked tiers
for budgets that the overhead had already spent.

A server with ``auto_tiers`` writes ``auto/host.json`` beside the traffic it hands to
``innfer tiers apply`` (``--host``)::

    {"overhead_ms": [...],        recent per-request samples (server.overhead's window)
     "waited_ms": [...],          each sample's wait before its handler ran (parse, the
                                  loop's turn; same order; absent: not recorded)
     "quiet_overhead_ms": 3.5,    the median overhead of answers that ran alone (0 or
                                  absent: none yet), which admission judges at where lower
     "budget_margin_ms": 1.0,     the server's budget_margin_ms
     "plan_overhead": false,      whether the model plans for the overhead (resolved)
     "overhead_quantile": 0.99,   the quantile it plans with
     "engine_speed": 1.1,         live engine time / profiled, median over the live tiers
     "engine_sigma": 0.3,         the spread the latency model learned live (null: none yet)
     "host_cpu_ms": 2.2,          request handling's CPU per row on the engines' CPUs
                                  (server.host_cpu; 0: handling has CPUs of its own)
     "host_cpu_batch_ms": 0.35,   the loop's CPU per batch there (likewise; absent: 0)
     "slots": 1,                  batches the model runs at once: its instances, no more
                                  than a shared device's slots (null: model.yaml's instances)
     "policy": "innfer"}          the server's scheduling policy (null: innfer; a server
                                  pinned to one tier, fixed:<tier>, writes null: another
                                  set need not have that tier)

and the replay then, per request (the same draws for every tier set compared): judges the
answer against ``budget - margin - overhead - waited`` (one recorded sample, drawn at
random: the replay starts a request where the traffic log stamped it, and the client paid
the wait before the handler too), plans it as the server does (``budget - margin``, and
with ``plan_overhead`` - whose budgets count from the parse - short by the samples'
quantile, with the excess over their median - or ``quiet_ms`` where lower - given back to
admission, and by the sample's
wait, which live leaves the scheduler that much less of the budget), and runs
each batch ``engine_speed`` times its frontier time, drawn with the live spread where there
is one (log-normal ``engine_sigma``; quiet-machine profiles have a fraction of it, and a
replay with their spread plans larger tiers than the live scheduler dares to), with its
planner told, as the live one is, whether handling shares the engines' CPUs
(``Scheduler.host_s``) and what each batch costs them (``Scheduler.batch_host_s``: the
batch sizes it forms; the replay's time does not charge it).

Example:
    >>> host = LiveHost(overhead_ms=(2.0, 3.0, 9.0), margin_ms=1.0)
    >>> judged, planned, grace = host.budgets(np.array([0.010, 0.020]), seed=0)
    >>> bool(np.all(judged <= planned)), grace
    (True, 0.0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.overhead import ESTIMATE_SAMPLES, reserve_of

# The policies a choice replays as the server runs them (``host.json``'s "policy").
REPLAYED_POLICIES = ("innfer", "slackfit")


@dataclass(frozen=True)
class LiveHost:
    """The serving process's view (see the module doc); times in milliseconds."""

    overhead_ms: tuple[float, ...] = ()
    margin_ms: float = 1.0
    plan_overhead: bool = False
    quantile: float = 0.99
    engine_speed: float = 1.0
    engine_sigma: float | None = None
    host_cpu_ms: float = 0.0
    slots: int | None = None
    policy: str | None = None
    waited_ms: tuple[float, ...] = ()  # empty, or one per overhead sample
    host_cpu_batch_ms: float = 0.0
    quiet_ms: float = 0.0  # a quiet server's median overhead (0: not known)

    def __post_init__(self) -> None:
        if not all(np.isfinite(v) and v >= 0 for v in self.overhead_ms):
            raise ValueError("overhead_ms samples must be finite and >= 0")
        if self.waited_ms and len(self.waited_ms) != len(self.overhead_ms):
            raise ValueError(
                f"waited_ms has {len(self.waited_ms)} samples, overhead_ms "
                f"{len(self.overhead_ms)}: one each, or none"
            )
        if not all(np.isfinite(v) and v >= 0 for v in self.waited_ms):
            raise ValueError("waited_ms samples must be finite and >= 0")
        if not (np.isfinite(self.margin_ms) and self.margin_ms >= 0):
            raise ValueError(f"budget_margin_ms must be >= 0, got {self.margin_ms}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"overhead_quantile must be in (0, 1), got {self.quantile}")
        if not (np.isfinite(self.engine_speed) and self.engine_speed > 0):
            raise ValueError(f"engine_speed must be > 0, got {self.engine_speed}")
        sigma = self.engine_sigma
        if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"engine_sigma must be >= 0 or null, got {sigma}")
        keys = {"quiet_ms": "quiet_overhead_ms"}  # as host.json names it
        for name in ("host_cpu_ms", "host_cpu_batch_ms", "quiet_ms"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{keys.get(name, name)} must be >= 0, got {value}")
        if self.slots is not None and not (isinstance(self.slots, int) and self.slots >= 1):
            raise ValueError(f"slots must be an int >= 1 or null, got {self.slots!r}")
        if self.policy is not None and self.policy not in REPLAYED_POLICIES:
            raise ValueError(
                f"policy must be one of {list(REPLAYED_POLICIES)} or null, got {self.policy!r}"
            )

    def budgets(self, budgets_s: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(judged, planned, grace) for requests with client budgets ``budgets_s``: the
        budget an answer must meet after the overhead (one sample each, seeded), the one
        the scheduler plans with, and the admission grace (seconds)."""
        budgets_s = np.asarray(budgets_s, dtype=float)
        margin = self.margin_ms / 1e3
        samples = np.asarray(self.overhead_ms, dtype=float) / 1e3
        waits = np.asarray(self.waited_ms or [0.0] * len(samples), dtype=float) / 1e3
        if len(samples):  # one sample per request: its overhead and its wait go together
            drawn = np.random.default_rng(seed).integers(0, len(samples), len(budgets_s))
            outside, waited = samples[drawn], waits[drawn]
        else:
            outside = waited = np.zeros(len(budgets_s))
        planned = budgets_s - margin
        grace = 0.0
        if self.plan_overhead and len(samples):
            # as the server plans: the latest of its samples (host.json lists them oldest
            # first); every one is still drawn above as a request's own overhead
            reserve, grace = reserve_of(
                samples[-ESTIMATE_SAMPLES:], self.quantile, self.quiet_ms / 1e3
            )
            planned = planned - reserve - waited
        return budgets_s - margin - outside - waited, planned, grace

    def to_json(self) -> dict:
        return {
            "overhead_ms": [round(float(v), 4) for v in self.overhead_ms],
            "waited_ms": [round(float(v), 4) for v in self.waited_ms],
            "budget_margin_ms": self.margin_ms,
            "plan_overhead": self.plan_overhead,
            "overhead_quantile": self.quantile,
            "engine_speed": self.engine_speed,
            "engine_sigma": self.engine_sigma,
            "host_cpu_ms": self.host_cpu_ms,
            "host_cpu_batch_ms": self.host_cpu_batch_ms,
            "quiet_overhead_ms": self.quiet_ms,
            "slots": self.slots,
            "policy": self.policy,
        }

    @classmethod
    def from_json(cls, data: dict) -> LiveHost:
        """From the server's dict (the module doc's fields; unknown ones are an error)."""
        known = {"overhead_ms", "waited_ms", "budget_margin_ms", "plan_overhead",
                 "overhead_quantile", "engine_speed", "engine_sigma", "host_cpu_ms",
                 "host_cpu_batch_ms", "quiet_overhead_ms", "slots", "policy"}  # fmt: skip
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a host view takes the fields {sorted(known)}; got {extra}")
        if "overhead_ms" not in data:  # every server writes it ([] before any request)
            raise ValueError(
                "a host view needs overhead_ms (the server's time per request outside queue "
                "and compute, ms; [] where it has none yet): without it the replay would "
                "count no overhead at all"
            )
        # Typed as the server writes them: bool("false") is True, and a string of digits
        # read as one sample per character.
        if not isinstance(data.get("plan_overhead", False), bool):
            raise ValueError(f"host view: plan_overhead is {data['plan_overhead']!r}, not a bool")
        for key in ("overhead_ms", "waited_ms"):
            if not isinstance(data.get(key, []), list):
                raise ValueError(f"host view: {key} is {data[key]!r}, not a list of ms")
        try:
            return cls(
                overhead_ms=tuple(float(v) for v in data.get("overhead_ms", ())),
                waited_ms=tuple(float(v) for v in data.get("waited_ms", ())),
                margin_ms=float(data.get("budget_margin_ms", 1.0)),
                plan_overhead=data.get("plan_overhead", False),
                quantile=float(data.get("overhead_quantile", 0.99)),
                engine_speed=float(data.get("engine_speed", 1.0)),
                engine_sigma=_optional(data.get("engine_sigma")),
                host_cpu_ms=float(data.get("host_cpu_ms", 0.0)),
                host_cpu_batch_ms=float(data.get("host_cpu_batch_ms", 0.0)),
                quiet_ms=float(data.get("quiet_overhead_ms", 0.0)),
                slots=data.get("slots"),
                policy=data.get("policy"),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"host view: {exc}") from None

    @classmethod
    def read(cls, path: str | Path) -> LiveHost:
        """``host.json`` as a server writes it; errors name the file."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: not a host view ({exc})") from None


def _optional(value) -> float | None:
    return None if value is None else float(value)

"""Host CPU: the CPU the serving process spends outside its engines per request row -
receiving, decoding, admitting, encoding, sending - and whether that CPU is the engines'
own.

Where the process has no more CPUs than its engines have threads (a pod with a one-CPU
limit, a server pinned to one core), every request's handling takes CPU the engines would
have run on, and the planner's deadline checks do not see it: the planner's first step
then keeps its tighter bound (``Scheduler.host_s`` > 0 turns on ``Snapshot.shared_cpu``).
With CPUs to spare the handling runs beside the engines and counts nothing. The amount is
exported and handed to auto-tiering's replay (``sim.live_host``).

Per batch, too: the loop thread's CPU for deciding, launching and settling each batch
(``loop_batch``), measured where it is spent, per batch run. Where it shares the engines'
CPUs a batch of 4 pays it once where 4 batches of one pay it 4 times, so the planner's
batch sizes count it (``Scheduler.batch_host_s``): the ResNet pinned to one core at 8
closed-loop clients served every request as a batch of one (its engine runs 4 rows in 4x
one row's time) and spent ~0.4 ms of the core's ~2.6 ms per request on each batch. Not in
it: the hand-offs' wake-ups between the loop and the engine thread (the self-pipe), and
the per-request records of settling; in it, the decision, whose cost grows with the queue.

Measured, not configured: the process's CPU time (``time.process_time``, every thread) less
the engines' own thread CPU over a window of a few hundred milliseconds, per row that
arrived in it (refused rows cost handling too, and the planner compares with the arrival
rate, which counts them). Pure: the caller passes CPU seconds and the time.

Known limit: an engine's CPU is its calling thread's (``time.thread_time``); with more than
one intra-op thread (ONNX Runtime ``threads: 2``) the pool threads' CPU - work and spin -
is counted as host CPU (0.5 ms per row measured with no request handling at all). The
planner reads the estimate only as "handling shares the engines' CPUs" (> 0), which is then
true anyway; the exported figure and auto-tiering's host view overstate it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("innfer.host_cpu")

WINDOW_S = 0.5  # a new sample at most this often: ~100 rows at a few hundred per second
MIN_ROWS = 16  # a window with fewer arrivals extends until it has this many
ALPHA = 0.3  # weight of each window's sample in the estimate: about the last 3 windows
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max ..."
# cgroup v1's CPU controller (the container's own cgroup is mounted there): quota -1 = none
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


def _quota(cpu_max: Path, cpu_v1: Path) -> float | None:
    """CPUs the cgroup CPU quota allows (v2's cpu.max, else v1's cfs quota / period), or
    None where no quota is set or none can be read."""
    try:
        quota, period = cpu_max.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:  # cgroup v1 (older nodes: Kubernetes < 1.25 defaults, RHEL/CentOS 7, ...)
        quota = int((cpu_v1 / "cpu.cfs_quota_us").read_text())
        period = int((cpu_v1 / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus(cpu_max: Path | None = None, cpu_v1: Path | None = None) -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a
    Kubernetes CPU limit) when one is set - cgroup v2's ``cpu.max``, else cgroup v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (on v1, a 2-CPU pod counted every core of
    its node). ``cpu_max`` / ``cpu_v1`` default to the module's paths.

    Example:
        >>> available_cpus() >= 1
        True
    """
    cpus = float(len(os.sched_getaffinity(0)))
    quota = _quota(
        CGROUP_CPU_MAX if cpu_max is None else cpu_max, CGROUP_V1_CPU if cpu_v1 is None else cpu_v1
    )
    if quota is not None:
        cpus = min(cpus, max(quota, 1.0))
    return cpus


def oversubscription(engine_threads: int, cpus: float) -> str | None:
    """What to tell an operator whose engines may run more threads at once than the
    process has CPUs (None: they fit).

    Example:
        >>> oversubscription(2, 2.0) is None
        True
        >>> oversubscription(4, 2.0)[:40]
        'the loaded models may run 4 engine threa'
    """
    if engine_threads <= cpus:
        return None
    return (
        f"the loaded models may run {engine_threads} engine threads at once (device_slots, "
        f"or each model's instances, x its threads) on {cpus:g} CPUs (affinity and cgroup "
        "CPU quota): they take turns on the CPUs, and batch latencies rise past their "
        "profiles - lower threads in model.yaml or device_slots, or raise the CPU limit"
    )


class HostCpu:
    """CPU seconds per arrived row outside the engines, and the loop's per batch (EWMAs
    over windows); 0 where the engines have CPUs of their own.

    Example:
        >>> h = HostCpu(cpus=1.0)
        >>> h.engine_threads = 1
        >>> h.refresh(process_cpu_s=0.0, now=0.0)
        >>> h.arrived(100); h.engine(0.2); h.loop_batch(0.0004)   # one batch of 100 rows
        >>> h.refresh(process_cpu_s=0.3, now=1.0)   # 0.3 s of CPU, 0.2 s of it in engines
        >>> round(h.per_row * 1e3, 3), round(h.per_batch * 1e3, 3)   # 1 ms per row
        (1.0, 0.4)
        >>> h.shares_cpus, HostCpu(cpus=4.0).shares_cpus   # 1 engine thread on 1 / 4 CPUs
        (True, False)
    """

    def __init__(self, cpus: float | None = None, window_s: float = WINDOW_S) -> None:
        self.cpus = available_cpus() if cpus is None else cpus
        self.window_s = window_s
        # Engine threads the loaded models may run at once (slots x intra-op threads):
        # the data plane sets it as models load (a warning when it exceeds the CPUs).
        self._engine_threads = 1
        self.estimate = 0.0  # CPU s per row, measured whether or not it is shared
        self.batch_estimate = 0.0  # loop CPU s per batch, measured likewise
        self._rows = 0
        self._engine_s = 0.0
        self.version = 0  # bumped when the estimates change (their readers resync)
        self._batches = 0  # batches whose engine CPU this window counted
        self._batch_s = 0.0  # the loop's CPU on its batches' own handling this window
        self._since: tuple[float, float] | None = None  # (time, process CPU) at window start

    @property
    def engine_threads(self) -> int:
        return self._engine_threads

    @engine_threads.setter
    def engine_threads(self, n: int) -> None:
        """Set as models load and unload; warns (once per new count) where it exceeds the
        CPUs."""
        if n != self._engine_threads:
            message = oversubscription(n, self.cpus)
            if message is not None:
                log.warning("%s", message)
        self._engine_threads = n

    @property
    def shares_cpus(self) -> bool:
        """Whether request handling runs on the engines' CPUs: no CPU is left over. (A change
        of ``cpus`` or ``engine_threads`` reaches the planner with the next window.)"""
        return self.cpus <= self.engine_threads

    @property
    def per_row(self) -> float:
        """What the planner counts per row: the estimate where handling shares the
        engines' CPUs, else 0."""
        return self.estimate if self.shares_cpus else 0.0

    @property
    def per_batch(self) -> float:
        """What the planner counts per batch (``Scheduler.batch_host_s``): the loop's CPU per
        batch where handling shares the engines' CPUs, else 0."""
        return self.batch_estimate if self.shares_cpus else 0.0

    def arrived(self, rows: int) -> None:
        self._rows += rows

    def engine(self, cpu_s: float) -> None:
        """A batch's engine-thread CPU seconds (one call per batch run)."""
        self._engine_s += cpu_s
        self._batches += 1

    def loop_batch(self, cpu_s: float) -> None:
        """Loop-thread CPU seconds spent on a batch as such (its decision, launch, settling),
        not on its requests one by one."""
        self._batch_s += cpu_s

    def due(self, now: float) -> bool:
        return self._since is None or now - self._since[0] >= self.window_s

    def refresh(self, process_cpu_s: float, now: float) -> None:
        """Close the window if it has rows enough: its host CPU per row joins the estimate."""
        if self._since is None:
            self._restart(process_cpu_s, now)
            return
        if self._rows < MIN_ROWS:
            return
        host = max(0.0, process_cpu_s - self._since[1] - self._engine_s) / self._rows
        self.estimate = _ewma(self.estimate, host)
        if self._batches:
            self.batch_estimate = _ewma(self.batch_estimate, self._batch_s / self._batches)
        self.version += 1
        self._restart(process_cpu_s, now)

    def _restart(self, process_cpu_s: float, now: float) -> None:
        self._since, self._rows, self._engine_s = (now, process_cpu_s), 0, 0.0
        self._batches, self._batch_s = 0, 0.0


def _ewma(estimate: float, sample: float) -> float:
    """``estimate`` moved ``ALPHA`` of the way to ``sample`` (the sample itself at first; a
    sample that is not finite changes nothing)."""
    if not math.isfinite(sample):
        return estimate
    return sample if not estimate else estimate + ALPHA * (sample - estimate)

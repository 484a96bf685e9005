"""Auto-tiering in a running server: record traffic, choose in the background, swap.

For each model whose ``model.yaml`` has ``auto_tiers``, one asyncio task checks every
``rebuild.check_interval_s``. Once ``rebuild.min_requests`` requests were recorded in the
last ``window_s``, ``rebuild.min_interval_s`` passed since the last change and the traffic
moved by more than ``rebuild.drift`` since the last choice (rate, budget quantiles, rows:
simulating costs CPU the serving process shares, so unchanged traffic is not re-judged -
unless the server serves another set than the one last chosen for: a reload by hand, a
changed model.yaml or ``auto_tiers.json``), it
writes that window - from its last shift in what the clients ask, where the requests a
choice replays hold one (``traffic.since_change``; the drift is judged on it too: a choice
for the traffic before a shift is stale by the time it is applied) - its last
``simulate_requests`` (all the choice replays), to
``traffic.csv`` in its own work directory, ``<model>/auto/<hostname>-<pid>-<n>/`` (replicas
sharing the repository's volume each have theirs; removed when the loop stops), and what
serving adds to each request beyond queue and compute (the learned overhead's recent
samples, the budget margin, plan_overhead, the engines' live speed against their profiles)
to ``host.json`` beside it - the choice replays both, so that it judges a set by what
clients would see (``sim.live_host``) - and runs ``innfer tiers apply`` on them, told which
set the server serves, in a separate process at the lowest CPU priority (Linux SCHED_IDLE,
and ``rebuild.nice``; OMP_NUM_THREADS=1 for its numpy, the engine check uses the model's
own threads): the choice (simulations), the engine builds and checks happen there, never on
the serving loop. That process writes ``auto_tiers.json`` only for a set worth its
``min_gain``; then the model is reloaded as a swap: the new runtime takes new requests at
once, the old one serves its whole queue (each request runs or expires by its own deadline:
none is failed) and closes. A failed apply, or a new set that does not load, leaves the
live set (and ``auto_tiers.json`` as it was) - as does a reload that serves model.yaml's
tiers instead, the frontier measured again meanwhile - and waits ``min_interval_s`` before
trying again; that interval counts from ``auto_tiers.json``'s ``chosen_at`` at start, so a
restarted server or a new replica does not change the set again at once. Replicas sharing a
volume take turns: the apply, the reload and the undo run under an ``flock`` of
``<model>/auto/apply.lock`` (a replica that finds it taken counts "waiting" and tries at
its next check); the undo puts the old file back only while the file still holds what this
apply wrote (a newer choice written meanwhile - by hand, or by a replica of a release
without the lock - stays), and the log says what the reload serves, which is what
``auto_tiers.json`` held then, not necessarily this replica's choice. Clients that pin a
tier by name (``tier``, ``min_tier``) get NOT_FOUND for a name the new set does not have:
pin names with auto-tiering only where the set is fixed.
Only the task and the reload run in the server; the server imports no simulator, so the
serving image needs ``sim/`` only as that process's code. The task's file operations (its
work directory, the locks, ``auto_tiers.json``) run on a thread of its own: on a shared
volume they can stall, and the serving loop must not stall with them.

A choice takes seconds to minutes; where the requests that came meanwhile (at least
``rebuild.min_requests``) moved away from those it was made for (``traffic.moved_away``:
the budgets' distribution beyond sampling noise, or the rows), it is not swapped in
(outcome ``stale``): ``auto_tiers.json`` is put back as the undo does, nothing counts as a
change, and the next check chooses for the traffic as it is now.

Metrics: ``innfer_tier_set_checks_total{model,outcome}`` (``OUTCOMES``: applied, kept,
stale, unchanged, waiting, no_frontier, locked, failed; each from the loop's start, at 0),
``innfer_tier_set_expected_gain{model}`` (the last choice's gain over the live set),
``innfer_tier_set_swap_seconds{model}`` (apply process + reload of the last change) and
``innfer_tier_set_enabled{model}`` (the data plane's: 1 while a loop runs, 0 where
model.yaml asks for one and it is off); the log says what changed and why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from runtime.atomic import write_bytes, write_json
from runtime.repository import (
    ACTIVE_FILE,
    APPLY_BUSY,
    APPLY_KEPT,
    FRONTIER_DIR,
    FRONTIER_FILE,
)
from runtime.repository.config import AutoTiersConfig
from runtime.utc import seconds
from server.daemon_call import DaemonWorker
from server.traffic import (
    CAPACITY,
    TrafficLog,
    drifted,
    moved_away,
    since_change,
    summarise_traffic,
    write_traffic,
)

log = logging.getLogger("innfer.autotier")

HOST_FILE = "host.json"  # beside traffic.csv: the view sim.live_host reads
APPLY_TIMEOUT_S = 1800.0  # a stuck builder is killed, the live set stays
WORK_DIR = "auto"  # <model>/auto/: one work directory per replica, and the lock
LOCK_FILE = "apply.lock"  # in <model>/auto/: one apply -> reload -> undo at a time
# In each work directory: flocked by its loop while it lives, and touched at its every
# check. A replica that died without stopping its loop (SIGKILL, OOM, a lost node) left its
# directory - a traffic window of up to simulate_requests rows - on the shared volume for
# good; with pods coming and going under an autoscaler they piled up. The next replica to
# take the model's lock removes a directory untouched for ``stale_work_s`` (at least
# STALE_WORK_S, and longer than an apply can hold a loop's check) whose lock it can take.
# Both, because flock across nodes depends on the volume (NFS emulates it with POSIX locks;
# a mount with local_lock ignores other nodes): the age alone keeps a live loop's directory
# where the lock says nothing.
ALIVE_FILE = "alive.lock"
STALE_WORK_S = 3600.0
# How often a loop looks for stopped replicas' directories (at its first check, then at most
# this often): at every check that finds something to do was not enough - a model whose
# traffic never moves is never re-chosen, and its dead replicas' windows stayed.
PRUNE_EVERY_S = 600.0
# Applies in a row whose traffic moved away before the swap (outcome "stale") after which
# the next choice waits rebuild.min_interval_s: traffic that keeps moving faster than an
# apply is chased no further, each try a whole apply's CPU.
STALE_LIMIT = 3
# A check's outcomes (innfer_tier_set_checks_total{outcome}); every one exported from 0.
OUTCOMES = (
    "applied", "kept", "stale", "unchanged", "waiting", "no_frontier", "locked", "failed",
)  # fmt: skip
# Outcomes of checks that ended before writing to the repository volume.
UNWRITTEN = ("waiting", "unchanged", "no_frontier")
_loops = itertools.count(1)  # tierers of this process: each its own work directory


class AutoTierer:
    """The background loop of one model.

    ``reload`` swaps the model (DataPlane.swap); ``live`` says what the server serves now
    (``SOURCE:NAMES``, `innfer tiers apply --live`); ``command`` builds the argv of the
    apply process from (repository, model, traffic file, result file, live): tests pass
    their own.

    Example:
        >>> t = AutoTierer("mnist", root, goals, traffic, plane.swap, metrics)  # doctest: +SKIP
        >>> t.start()  # on the server's loop; t.stop() ends it  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        repository: Path,
        goals: AutoTiersConfig,
        traffic: TrafficLog,
        reload: Callable[[str], Awaitable[None]],
        metrics,
        live: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
        command: Callable[[Path, str, Path, Path, str], list[str]] | None = None,
        host: Callable[[], dict] | None = None,
        frontier_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.name = name
        self.repository = Path(repository)
        self.goals = goals
        self.traffic = traffic
        self.reload = reload
        self.metrics = metrics
        self.live = live
        self.clock = clock
        self.command = command or apply_command
        self.host = host
        # Why the model's frontier cannot be chosen from now (missing, corrupted, built for
        # other settings than model.yaml's), with the fix, or None; called on the file thread.
        # Said as the loop starts - not after traffic came, then at every min_interval_s as a
        # failed apply - and while it says something, checks wait instead of applying.
        self.frontier_problem = frontier_problem
        self._frontier_said: str | None = None
        # min_interval_s counts from the last change on disk, made by this process before a
        # restart or by another replica: a new process must not change the set at once.
        # None: not read yet - the first check reads it, on the file thread (this object is
        # made on the serving loop, by a model's load).
        self.last_change: float | None = None
        self.changes = 0
        self.chosen_for: dict | None = None  # traffic summary of the last completed choice
        # What the server served when that choice was made (``live``'s SOURCE:NAMES): a
        # reload that serves something else (auto_tiers.json deleted or stale, model.yaml's
        # tiers edited, another replica's choice) is judged anew, however steady the traffic.
        self.chosen_live: str | None = None
        self._said_waiting = False  # the first check held by min_requests logged why
        self._said_locked = False  # the first check another replica's lock held logged it
        self._stale_in_a_row = 0  # applies in a row judged stale: STALE_LIMIT
        for outcome in OUTCOMES:  # from 0: a first failure is an increase() alerts see
            metrics.tier_set_checks.labels(name, outcome)
        if goals.rebuild.min_requests > CAPACITY:  # (it would wait for ever: counted as that)
            log.warning(
                "model %s: auto_tiers.rebuild.min_requests %d is more than the %d requests a "
                "server keeps per model; it counts as %d (lower it in model.yaml)",
                name, goals.rebuild.min_requests, CAPACITY, CAPACITY,
            )  # fmt: skip
        # This replica's inputs and result (never another's): <model>/auto/<host>-<pid>-<n>.
        self.work = self.repository / name / WORK_DIR / f"{_replica()}-{next(_loops)}"
        self._alive: int | None = None  # our flock of work/ALIVE_FILE while the loop lives
        self._task: asyncio.Task | None = None
        self._removed: concurrent.futures.Future | None = None  # stop's removal of work
        self._checking = asyncio.Lock()  # the loop and a caller never check at once
        # In a check's own swap (its reload awaited): a ``stop(after_check=True)`` - from
        # that very load, bringing new goals - waits for the check's end, so the change it
        # made is counted and said (cancelled there, it never was: review helper-237).
        self._swapping = False
        self._stop_pending = False
        self._reread_change = False  # ``reloaded``: auto_tiers.json's chosen_at, next check
        self._pruned_at = -float("inf")  # on ``clock``: when this loop last looked
        self._volume_error: tuple | None = None  # (errno, path) the log last said, if any
        # Every file operation of a check runs on this one thread, in order, never on the
        # serving loop: the work directories live on a volume replicas share, where an
        # open, a lock or a stat can stall for seconds (an NFS server failing over), and
        # on the loop that stalled every request. One thread: the work directory's state
        # (``_alive``) is only touched there, and ``stop``'s removal comes after any
        # operation still running. Started at the first use.
        # (a daemon thread: a call stuck on the volume must not hold the exit either)
        self._files = DaemonWorker(f"innfer-autotier-{name}")

    def start(self) -> None:
        """Start the loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def watch_frontier(self, problem: Callable[[], str | None]) -> None:
        """A reload kept this loop: judge the frontier by that load's model.yaml (``problem``)
        and say now, not at the next check, where it is unusable."""
        self.frontier_problem = problem
        self._frontier_said = None
        if self._task is not None and not self._task.done():
            task = asyncio.get_running_loop().create_task(self._frontier_usable())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _frontier_usable(self) -> bool:
        """Whether the frontier can be chosen from; where not, its problem is logged (once
        per problem, with its fix)."""
        if self.frontier_problem is None:
            return True
        problem = await self._io(self.frontier_problem)
        if problem is None:
            if self._frontier_said is not None:
                log.info("model %s: its frontier is usable again; auto-tiering goes on", self.name)
            self._frontier_said = None
            return True
        if problem != self._frontier_said:
            self._frontier_said = problem
            log.error(
                "model %s: auto-tiering cannot choose (it serves %s): %s; its checks wait "
                "until then", self.name, _safely(self.live), problem,
            )  # fmt: skip
        return False

    def reloaded(self) -> None:
        """The model was loaded again by another hand than this loop's swap: what it serves
        is judged anew, and its auto_tiers.json's ``chosen_at`` read again for the
        interval before the next change."""
        self.chosen_for = None
        self._reread_change = True

    def stop(self, after_check: bool = False) -> None:
        """Cancel the loop (a running apply process is killed; the live set stays) and
        remove this loop's work directory once it has ended. ``after_check``: where a check
        is in its own swap (the caller is that swap's load), once that check has ended."""
        if after_check and self._swapping:
            self._stop_pending = True
            return
        if self._task is None:
            self._remove_work()
            self._files.shutdown(wait=False)
            return

        def remove(_: asyncio.Task) -> None:  # after whatever the file thread still runs
            with contextlib.suppress(RuntimeError):  # (shut down already: stopped twice)
                self._removed = self._files.submit(self._remove_work)
            self._files.shutdown(wait=False)

        self._task.add_done_callback(remove)
        self._task.cancel()

    async def stopped(self) -> None:
        """Wait until ``stop``'s work is done - the loop ended, its work directory removed
        - for the server's stop to await (bounded there): left to a callback and a daemon
        thread, the directory stayed behind in 2 of 12 stops (review helper-266)."""
        if self._task is None:
            return  # (removed in stop itself)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(self._task)  # (its end: a cancel, or its own error)
        for _ in range(100):  # its done-callback queues the removal on the file thread
            if self._removed is not None:
                break
            await asyncio.sleep(0)
        if self._removed is not None:
            with contextlib.suppress(Exception):  # (said by _remove_work itself)
                await asyncio.wrap_future(self._removed)

    async def _io(self, fn: Callable, *args, undo: Callable | None = None):
        """``fn(*args)`` on the file thread, awaited. Cancelling the caller does not stop
        ``fn`` once it runs; ``undo(result)`` then runs on that thread when it is done (a
        lock it took must not stay held by nobody)."""
        fut = self._files.submit(fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if undo is not None:
                fut.add_done_callback(
                    lambda f: undo(f.result()) if not f.cancelled() and f.exception() is None
                    else None
                )  # fmt: skip
            raise

    def _remove_work(self) -> None:
        if self._alive is not None:
            os.close(self._alive)
            self._alive = None
        shutil.rmtree(self.work, ignore_errors=True)

    def _make_work(self) -> None:
        """This loop's work directory, flocked as alive - again where the file we hold is
        no longer the one there (the directory was removed: by hand, or by a replica that
        found it stale)."""
        self.work.mkdir(parents=True, exist_ok=True)
        alive = self.work / ALIVE_FILE
        if self._alive is not None:
            try:
                same = os.path.samestat(os.fstat(self._alive), os.stat(alive))
            except OSError:
                same = False
            if not same:
                os.close(self._alive)
                self._alive = None
        if self._alive is None:
            self._alive = _try_lock(alive)

    def _touch_alive(self) -> None:
        """Mark this loop's work directory as in use now (``prune_work`` reads the age)."""
        if self._alive is not None:
            with contextlib.suppress(OSError):
                os.utime(self.work / ALIVE_FILE)

    def _housekeep(self, prune: bool) -> None:
        """At every check, on the file thread: touch this loop's lock file, and where
        ``prune``, remove stopped replicas' work directories under the model's lock (one
        replica at a time; one that finds it taken leaves them to the holder or a later
        check). Housekeeping never fails a check: a read-only volume is skipped."""
        self._touch_alive()
        if not prune:
            return
        try:
            if not self.work.parent.is_dir():  # no directory yet: nothing to prune
                return
            lock = _try_lock(self.work.parent / LOCK_FILE)
        except OSError as exc:  # (is_dir re-raises EIO, ESTALE: a troubled volume)
            log.debug("model %s: cannot lock %s to prune: %s", self.name, LOCK_FILE, exc)
            return
        if lock is None:
            return
        try:
            prune_work(self.work, time.time(), self.stale_work_s())
        finally:
            os.close(lock)

    def _enter(self) -> int | None:
        """This loop's work directory, made and flocked, and the model's apply lock as
        ``_try_lock`` gives it (None: another replica or loop holds it)."""
        self._make_work()
        return _try_lock(self.work.parent / LOCK_FILE)

    def stale_work_s(self) -> float:
        """How long a work directory may go untouched before another replica may remove
        it: longer than an apply can hold this loop's check, and than a few checks."""
        return max(STALE_WORK_S, APPLY_TIMEOUT_S + 3 * self.goals.rebuild.check_interval_s)

    async def run(self) -> None:
        """Check forever (cancel the task to stop); one failed check never ends the loop.
        A frontier that cannot be chosen from is said at once, as the model loads."""
        with contextlib.suppress(Exception):  # (a check says it again)
            await self._frontier_usable()
        while True:
            await asyncio.sleep(self.goals.rebuild.check_interval_s)
            try:
                outcome = await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. the apply timed out, the volume is read-only
                self._failed(exc)
            else:
                # Only a check that wrote to the volume says it is fine again: the waits
                # after a failure (min_interval_s) cleared it, and the same warning came
                # back at every retry (review helper-283).
                if outcome not in UNWRITTEN:
                    self._volume_error = None

    def _failed(self, exc: Exception) -> None:
        """A check that raised: back off like a failed apply, and say why - the volume (read-
        only, not ours, full) in one line, again only when the cause changes (a traceback at
        every check filled the log of a read-only mount), anything else with its traceback."""
        self.last_change = self.clock()
        self._count("failed")
        if not (isinstance(exc, OSError) and exc.errno in VOLUME_ERRNOS):
            log.exception("model %s: auto-tiering check failed", self.name)
        elif self._volume_error != (exc.errno, exc.filename):
            self._volume_error = (exc.errno, exc.filename)
            log.warning(
                "model %s: auto-tiering cannot write its work (%s: %s): no tiers are chosen "
                "until the repository volume is writable and has room; the served tiers stay",
                self.name, exc.strerror, exc.filename,
            )  # fmt: skip

    async def check(self) -> str:
        """One check; returns its outcome (``OUTCOMES``)."""
        async with self._checking:
            try:
                return await self._check()
            finally:
                self._swapping = False
                if self._stop_pending:  # asked for during this check's swap: now
                    self._stop_pending = False
                    self.stop()

    async def _check(self) -> str:
        now = self.clock()
        prune = now - self._pruned_at >= PRUNE_EVERY_S
        if prune:
            self._pruned_at = now
        await self._io(self._housekeep, prune)
        if self.last_change is None or self._reread_change:
            # At the first check, and after a load this loop did not make (an operator's
            # `tiers apply`, another replica's set): min_interval_s counts from that choice
            # too - it was replaced at the next check, seconds later (review helper-237).
            active = self.repository / self.name / ACTIVE_FILE
            chosen = await self._io(_last_change, active, self.clock)
            self._reread_change = False  # (after the read: a failed one tries again)
            self.last_change = chosen if self.last_change is None else max(self.last_change, chosen)
        rebuild = self.goals.rebuild
        if now - self.last_change < rebuild.min_interval_s:
            return self._count("waiting")
        # Copied on the loop (the ring changes there), filtered, sorted and summarised off it.
        # The check's time is the copy's: requests that came during the housekeeping (a
        # slow volume) were in the choice's window and, after the apply, in the requests
        # since the check too - the comparison leaning to "not moved" (review helper-216).
        now = self.clock()
        loop = asyncio.get_running_loop()
        needed = min(rebuild.min_requests, CAPACITY)  # (above CAPACITY: warned at start)
        rows, summary = await loop.run_in_executor(
            None, _observed, self.traffic.snapshot(), now, self.goals.window_s,
            rebuild.drift, needed, self.goals.simulate_requests,
        )  # fmt: skip
        if summary["requests"] < needed:
            if not self._said_waiting:  # once: a quiet model waits at every check
                self._said_waiting = True
                log.info(
                    "model %s: auto-tiering waits for %d requests (rebuild.min_requests) "
                    "within auto_tiers.window_s (%g s); %d so far (lower min_requests, or "
                    "raise window_s, where the traffic stays below that)",
                    self.name, needed, self.goals.window_s, summary["requests"],
                )  # fmt: skip
            return self._count("waiting")
        self._said_waiting = False
        if (
            self.chosen_for is not None
            and self.live() == self.chosen_live
            and not drifted(self.chosen_for, summary, rebuild.drift)
        ):
            return self._count("unchanged")  # the live set was chosen for traffic like this
        if not await self._frontier_usable():  # an apply would fail alike: said once, waits
            return self._count("no_frontier")
        lock = await self._io(self._enter, undo=_close)
        if lock is None:  # another replica (or loop) is applying a set for this model
            if not self._said_locked:  # once until this replica gets the lock (a line per
                self._said_locked = True  # check_interval_s before)
                log.info("model %s: another replica is choosing this model's tiers; trying "
                         "again at each check", self.name)  # fmt: skip
            return self._count("locked")
        self._said_locked = False
        try:
            outcome = await self._apply_and_swap(summary, rows, now)
        finally:
            # Released on the file thread too (on NFS an unlock is a call to the server),
            # after this check's last file operation; a cancelled check's too, unawaited.
            released = self._files.submit(self._release, lock)
        # Awaited where the check ends normally: a check that returned has let go of the
        # lock (another loop on this volume that checks next must not find it still held).
        # Shielded: a check cancelled while the release is queued must not cancel it with
        # the wait (the lock stayed held by nobody until the process exited).
        await asyncio.shield(asyncio.wrap_future(released))
        return outcome

    def _release(self, lock: int) -> None:
        """Close the model's apply lock (on the file thread). A failed close (EIO from an
        NFS server) is said, not raised: the check's outcome is counted already, and the
        kernel drops the lock with the descriptor either way."""
        try:
            os.close(lock)
        except OSError as exc:
            log.warning("model %s: closing its apply lock failed (%s)", self.name, exc)

    async def _apply_and_swap(self, summary: dict, rows: tuple, checked: float) -> str:
        """Choose, apply and reload, under the model's lock (``_check``, which began at
        ``checked`` on ``clock``)."""
        work = self.work
        traffic, result = work / "traffic.csv", work / "choice.json"
        rows = tuple(col[-self.goals.simulate_requests :] for col in rows)
        host = self.host() if self.host is not None else None
        await self._io(_write_inputs, traffic, rows, work / HOST_FILE, host, result)
        active = self.repository / self.name / ACTIVE_FILE
        before = await self._io(_bytes, active)
        t0 = self.clock()
        live = self.live()  # the data plane's state: read on the loop
        argv = await self._io(self.command, self.repository, self.name, traffic, result, live)
        code = await self._apply(argv)
        if code != 0:  # kept or failed: the stale applies, if any, are no longer in a row
            self._stale_in_a_row = 0
        choice = await self._io(_read, result)
        if choice is not None:
            self.metrics.tier_set_gain.labels(self.name).set(choice.get("gain", 0.0))
        if code == APPLY_KEPT:
            self.chosen_for, self.chosen_live = summary, live
            return self._count("kept")
        if code == APPLY_BUSY:  # a hand apply on this machine: tried again at the next check
            log.info("model %s: another `innfer tiers apply` of it runs on this machine; "
                     "trying again at the next check", self.name)  # fmt: skip
            return self._count("locked")
        if code != 0:
            self.last_change = self.clock()  # back off: the next try waits min_interval_s
            log.error("model %s: `innfer tiers apply` exited %s (%s); the live tiers stay, "
                      "retried in rebuild.min_interval_s", self.name, code,
                      getattr(self, "_last_line", "") or "no output")  # fmt: skip
            return self._count("failed")
        written = await self._io(_bytes, active)  # this apply's: the undo takes back only that
        # Shielded as the reload is: a check cancelled between the apply's write and the
        # undo left a choice judged stale on disk, for the next start to serve.
        moved, restored = await asyncio.shield(self._undo_if_moved(checked, rows, written, before))
        if moved is not None:
            # Chosen for the window before a shift, swapped in after it, a set served the
            # new traffic until the next choice: live, 32 s of the smallest tier after
            # budgets tightened (bench/auto_tiers_live.py, session 60). Not a change: the
            # next check chooses for the traffic as it is, min_interval_s or not - unless
            # the traffic moved during STALE_LIMIT applies in a row: then it keeps moving
            # faster than an apply, and each try costs a whole apply's CPU.
            self.chosen_for = self.chosen_live = None
            self._stale_in_a_row += 1
            again = self._stale_in_a_row < STALE_LIMIT
            if not again:
                self._stale_in_a_row = 0
                self.last_change = self.clock()
            log.log(
                logging.INFO if again else logging.WARNING,
                "model %s: traffic moved while the tiers were chosen (%s); the choice %s is "
                "not swapped in%s, and %s",
                self.name, moved, choice["best"]["tiers"] if choice else "?",
                "" if restored else f" ({ACTIVE_FILE} was rewritten meanwhile: left as it is)",
                "the next check chooses again" if again else f"after {STALE_LIMIT} such "
                "applies in a row the next choice waits rebuild.min_interval_s",
            )  # fmt: skip
            return self._count("stale")
        self._stale_in_a_row = 0
        try:
            # Shielded: cancelling this loop (shutdown, new goals) must not cut a swap in
            # half - the old runtime, already out of the data plane, still drains its queue.
            self._swapping = True
            await asyncio.shield(self.reload(self.name))
        except Exception:
            self.last_change = self.clock()
            log.exception("model %s: the new tiers did not load; the live tiers stay", self.name)
            # What is served stays what the file says - unless a newer choice was written
            # during the reload: not this apply's to undo.
            if not await self._io(_restore_if, active, written, before):
                log.warning(
                    "model %s: %s was rewritten during the reload (another replica, or "
                    "`innfer tiers apply`); left as it is", self.name, ACTIVE_FILE,
                )  # fmt: skip
            return self._count("failed")
        seconds = self.clock() - t0
        self.last_change = self.clock()
        # What the reload serves is what auto_tiers.json held then: this apply's choice, or
        # a newer one another writer put there meanwhile. Say what is served.
        try:
            served = self.live()
        except Exception:  # the swap is done; a log line is no reason to fail the check
            log.exception("model %s: could not tell what the reload serves", self.name)
            served = "?"
        chosen = choice["best"]["tiers"] if choice is not None else None
        # the frontier's tiers, by name: model.yaml's may be named like the candidates
        # (w100, w050) and a fallback to them was counted applied (review 168)
        ours = (
            chosen is not None
            and served.startswith("frontier:")
            and set(served.partition(":")[2].split(",")) == set(chosen)
        )
        refused = chosen is not None and not ours and written is not None
        if refused and served.startswith("model.yaml:"):
            # The load refused this choice and fell back to model.yaml's tiers: the frontier
            # it names was replaced meanwhile (`innfer build`), or model.yaml changed (the
            # repository's warning above says which). Not a change; nobody chose what is
            # served now for this traffic, so the next check past min_interval_s judges it.
            self.chosen_for = self.chosen_live = None
            why = await self._io(_refused, active, written)
            log.error(
                "model %s: the reload serves model.yaml's tiers (%s), not this choice %s: "
                "%s; the next check chooses again after rebuild.min_interval_s",
                self.name, served, chosen, why,
            )  # fmt: skip
            return self._count("failed")
        # What is served was chosen for this traffic: this replica's choice, or a newer one
        # another writer made meanwhile (judged again when traffic or the served set moves).
        self.chosen_for, self.chosen_live = summary, served
        self.changes += 1
        self.metrics.tier_set_swap_seconds.labels(self.name).set(seconds)
        if not ours:
            log.warning(
                "model %s: now serving %s, not this replica's choice %s: %s was rewritten "
                "meanwhile (another replica, or `innfer tiers apply`); swapped in %.1f s",
                self.name, served, chosen, ACTIVE_FILE, seconds,
            )  # fmt: skip
        else:
            # A live set that broke the goals is replaced whatever the gain: say why.
            breaks = "; ".join(choice.get("live_breaks") or [])
            log.info(
                "model %s: tiers %s -> %s (expected: served accuracy %+.2f%%, attainment "
                "%+.2f%% on %d recent requests, budgets p50 %.1f ms, %.1f req/s)%s; swapped in "
                "%.1f s",
                self.name, choice["current"]["tiers"], served,
                100 * choice.get("served_accuracy_gain", 0.0),
                100 * choice.get("attainment_gain", 0.0), choice["traffic"]["requests"],
                choice["traffic"]["budget_ms_p10_p50_p90"][1], choice["traffic"]["rate_per_s"],
                f", replacing a set that broke the goals ({breaks})" if breaks else "", seconds,
            )  # fmt: skip
        return self._count("applied")

    async def _undo_if_moved(
        self, checked: float, window: tuple, written: bytes | None, before: bytes | None
    ) -> tuple[str | None, bool]:
        """(how the traffic moved away since ``checked``, whether ``auto_tiers.json`` was put
        back to ``before``), or (None, False) where it did not move - or the comparison
        failed, said in the log: the choice is swapped in as it was before this check.
        One job on the file thread, submitted before this coroutine's first await: a
        ``stop()`` that cancels the check shuts that thread down only after it (its jobs run
        in order; one submitted after the shutdown raised, and the stale choice stayed on
        disk for the next start - review helper-216), and the model's lock, released by a
        later job, is still held while it restores."""
        rebuild = self.goals.rebuild
        now = self.clock()
        job = self._files.submit(
            _judge, self.name, self.traffic.snapshot(), now, now - checked, window,
            rebuild.drift, min(rebuild.min_requests, CAPACITY),
            self.repository / self.name / ACTIVE_FILE, written, before,
        )  # fmt: skip
        return await asyncio.wrap_future(job)

    async def _apply(self, argv: list[str]) -> int:
        # nice(1) rather than a preexec_fn: the server has engine threads, and a fork that
        # runs Python code before exec may deadlock in a threaded process.
        nice = self.goals.rebuild.nice
        argv = ["nice", "-n", str(nice), *argv] if nice else argv
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), APPLY_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if not isinstance(exc, asyncio.CancelledError):  # (a bare TimeoutError before)
                log.error(
                    "model %s: tiers apply ran past %g s and was killed; the live tiers "
                    "stay, and a later check tries again (a "
                    "saturated host starves it: it runs at idle priority)",
                    self.name, APPLY_TIMEOUT_S,
                )  # fmt: skip
            raise
        lines = out.decode(errors="replace").splitlines()[-20:]
        for line in lines:
            log.info("model %s: tiers apply: %s", self.name, line)
        self._last_line = _failure(lines)
        return proc.returncode

    def _count(self, outcome: str) -> str:
        self.metrics.tier_set_checks.labels(self.name, outcome).inc()
        return outcome


# The most of an apply's failure the error line quotes (its output lines are at INFO).
FAILURE_CHARS = 600


def _failure(lines: list[str]) -> str:
    """The failure an apply's output ends with, for the error log (it said only the exit
    status): its ``innfer tiers: error:`` line and the lines after it - a YAML error's text
    spans several, and the last alone said where, not what (review helper-237) - else its
    last line.

    Example:
        >>> _failure(["choosing ...", "innfer tiers: error: bad yaml:", "  in line 2"])
        'innfer tiers: error: bad yaml: in line 2'
    """
    text = [x.strip() for x in lines if x.strip()]
    start = next((i for i in range(len(text) - 1, -1, -1) if "error:" in text[i]), None)
    said = " ".join(text[start:]) if start is not None else (text[-1] if text else "")
    return said if len(said) <= FAILURE_CHARS else said[: FAILURE_CHARS - 3] + "..."


# ``python -m innfer`` without the working folder on the import path: started from a
# project folder holding its own server.py (or runtime/, sim/), the apply imported that and
# exited 1 at every check - auto-tiering never applied a set (review helper-299). -P is
# Python 3.11's switch for it; on 3.10 the first path entry (the folder) is dropped by hand.
INNFER = (
    [sys.executable, "-P", "-m", "innfer"]
    if sys.version_info >= (3, 11)
    else [sys.executable, "-c", "import runpy, sys; del sys.path[0]; "
          "runpy.run_module('innfer', run_name='__main__', alter_sys=True)"]
)  # fmt: skip


def apply_command(repository: Path, name: str, traffic: Path, result: Path, live: str) -> list:
    """``innfer tiers apply`` in this interpreter (the serving image installs the CLI), with
    the host view written beside the traffic where there is one; it ends with this process
    (``--parent-pid``: a crashed server leaves no builder behind)."""
    host = traffic.with_name(HOST_FILE)
    return [
        *INNFER, "tiers", "apply", str(repository), name,
        "--traffic", str(traffic), "--result", str(result), "--live", live,
        "--parent-pid", str(os.getpid()), "--background",
        *(["--host", str(host)] if host.is_file() else []),
    ]  # fmt: skip


def _observed(
    traffic: TrafficLog, now: float, seconds: float, drift: float, needed: int, simulated: int
) -> tuple[tuple, dict]:
    """(arrivals, budgets ms, rows) of the last ``seconds`` of ``traffic`` and their
    ``summarise_traffic``: what a choice is made for and its drift judged on. Where the
    ``simulated`` requests a choice replays (the window's last) hold a shift with
    ``needed`` requests after it (``since_change``), the window starts at the shift; one
    before them is in no choice already. Off the loop: a full ring sorts for tens of
    milliseconds."""
    rows = traffic.window(now, seconds)
    start = since_change(rows, drift, needed, within=simulated)
    rows = tuple(col[start:] for col in rows)
    return rows, summarise_traffic(*rows)


def _judge(
    name: str,
    traffic: TrafficLog,
    now: float,
    seconds: float,
    window: tuple,
    drift: float,
    needed: int,
    active: Path,
    written: bytes | None,
    before: bytes | None,
) -> tuple[str | None, bool]:
    """``AutoTierer._undo_if_moved``'s job (on the file thread): how the last ``seconds``
    of ``traffic`` moved away from ``window`` (None where they did not, are fewer than
    ``needed``, or could not be compared: said in the log), and, where they did, whether
    ``active`` was put back from ``written`` to ``before``."""
    try:
        since = traffic.window(now, seconds)
        moved = moved_away(window, since, drift) if len(since[0]) >= needed else None
    except Exception:
        log.exception("model %s: could not compare the traffic since the check with the "
                      "choice's; swapping it in", name)  # fmt: skip
        return None, False
    if moved is None:
        return None, False
    return moved, _restore_if(active, written, before)


def _write_inputs(
    traffic: Path, rows: tuple, host_path: Path, host: dict | None, result: Path
) -> None:
    """The apply process's inputs: the traffic window, and the host view (removed where
    there is none, so that a stale one is never replayed); the last result removed."""
    result.unlink(missing_ok=True)
    write_traffic(traffic, *rows)
    if host is None:
        host_path.unlink(missing_ok=True)
    else:
        write_json(host_path, host)


def _open_for_lock(path: Path) -> int:
    """A descriptor of ``path`` to lock: for writing where allowed, else read-only."""
    try:
        return os.open(path, os.O_RDWR)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return os.open(path, os.O_RDONLY)


def prune_work(own: Path, now: float, stale_s: float = STALE_WORK_S) -> list[str]:
    """Remove the work directories beside ``own`` that no live loop holds and return their
    names: those untouched for ``stale_s`` (their ``ALIVE_FILE``, else the directory)
    whose ``ALIVE_FILE``, if any, is free to lock - held while it is removed. Called under
    the model's apply lock, so one replica prunes at a time.

    Example:
        >>> prune_work(Path("/nonexistent/m/auto/me-1-1"), time.time())
        []
    """
    removed = []
    try:
        siblings = [d for d in own.parent.iterdir() if d.is_dir() and d != own]
    except OSError:
        return removed
    for d in siblings:
        alive = d / ALIVE_FILE
        try:
            has_alive = alive.exists()
            if now - (alive if has_alive else d).stat().st_mtime < stale_s:
                continue
            # Never created: a directory removed meanwhile (its loop stopped) is skipped,
            # not an error that fails the check. For writing where allowed: an NFS client
            # emulates flock with fcntl locks, and an exclusive one needs a file open for
            # writing (flock(2)) - read-only, no dead replica's folder was ever pruned on
            # the volume the README names (review 168); a lock file we may not write is
            # tried read-only (a local volume locks it so).
            fd = _open_for_lock(alive) if has_alive else None
        except OSError:
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its loop lives (BlockingIOError), or the lock cannot be had
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        removed.append(d.name)
    for name in LEGACY_WORK_FILES:  # an older innfer's, beside the directories
        f = own.parent / name
        try:
            if now - f.stat().st_mtime >= stale_s:
                f.unlink()
                removed.append(name)
        except OSError:  # none (the usual case), or removed meanwhile
            continue
    if removed:
        log.info("removed the work of %d stopped replicas: %s", len(removed),
                 ", ".join(sorted(removed)))  # fmt: skip
    return removed


# A check that fails on one of these is told in one line, not a traceback: the volume is
# read-only, not ours, or full.
VOLUME_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})

# The files auto-tiering kept in ``auto/`` itself before each replica had its own work
# directory: left by an upgrade, never read again (review helper-143).
LEGACY_WORK_FILES = ("traffic.csv", "host.json", "choice.json")


def _replica() -> str:
    """This process in a file name: ``<hostname>-<pid>`` (a pod's name on Kubernetes)."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{os.getpid()}"


def _try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` of ``path`` (created where missing) as an open descriptor -
    closing it releases the lock - or None where another process or loop holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _last_change(active: Path, clock: Callable[[], float]) -> float:
    """When ``active`` (auto_tiers.json) was chosen, on ``clock``: its ``chosen_at`` (UTC,
    written by `innfer tiers apply`) as seconds before now, clamped at 0 (a clock ahead of
    ours); -inf where there is no such file or it says no time."""
    try:
        chosen_at = json.loads(active.read_text())["chosen_at"]
        then = seconds(chosen_at)
    except (OSError, ValueError, KeyError, TypeError):
        return -float("inf")
    return clock() - max(0.0, time.time() - then)


def _bytes(path: Path) -> bytes | None:
    """``path``'s content, None where it is absent."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _restore_if(path: Path, written: bytes | None, before: bytes | None) -> bool:
    """Put ``path`` back as it was (``before``; ``None``: absent) where it still holds
    ``written``; whether it did."""
    if _bytes(path) != written:
        return False
    if before is None:
        path.unlink(missing_ok=True)
    else:
        write_bytes(path, before)
    return True


def _refused(active: Path, written: bytes | None) -> str:
    """Why a load served model.yaml's tiers after this apply wrote ``written`` to ``active``
    (auto_tiers.json), as far as the files tell."""
    now = _bytes(active)
    if now != written:
        return (f"{ACTIVE_FILE} was rewritten or removed meanwhile (another replica, "
                "`innfer tiers apply`, or by hand)")  # fmt: skip
    try:
        chose_on = json.loads(written or b"{}").get("frontier_sha256")
        frontier = json.loads((active.parent / FRONTIER_DIR / FRONTIER_FILE).read_text())
        measured = frontier.get("source_sha256") if isinstance(frontier, dict) else None
    except (OSError, ValueError):
        return (f"{FRONTIER_DIR}/{FRONTIER_FILE} was removed or rewritten meanwhile (`innfer "
                "build`?): run `innfer build` where it is damaged")  # fmt: skip
    if chose_on != measured:
        return (f"the frontier it was chosen on was replaced meanwhile (`innfer build` measured "
                f"it again); {ACTIVE_FILE} names the old one and is ignored")  # fmt: skip
    return "the load refused it (the repository's warning above says why: model.yaml changed?)"


def _safely(fn: Callable[[], str]) -> str:
    """``fn()`` for a log line: "?" where it fails (a log line is no reason to fail)."""
    try:
        return fn()
    except Exception:
        return "?"


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

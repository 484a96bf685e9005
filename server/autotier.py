"""Auto-tiering in a running server: record traffic, choose in the background, swap.

For each model whose ``model.yaml`` has ``auto_tiers``, one asyncio task checks every
``rebuild.check_interval_s``. Once ``rebuild.min_requests`` requests were recorded in the
last ``window_s``, ``rebuild.min_interval_s`` passed since the last change and the traffic
moved by more than ``rebuild.drift`` since the last choice (rate, budget quantiles, rows:
simulating costs CPU the serving process shares, so unchanged traffic is not re-judged), it
writes that window (its last ``simulate_requests`` requests: all the choice replays) to
``<model>/auto/traffic.csv``, and what serving adds to each request beyond queue and compute
(the learned overhead's recent samples, the budget margin, plan_overhead, the engines' live
speed against their profiles) to ``auto/host.json`` - the choice replays both, so that it
judges a set by what clients would see (``sim.live_host``) - and runs ``innfer tiers apply``
on them, told which set the server serves, in a separate process at the lowest CPU priority
(Linux SCHED_IDLE, and ``rebuild.nice``; OMP_NUM_THREADS=1 for its numpy, the engine check
uses the model's own threads): the choice (simulations), the engine builds and checks happen
there, never on the serving loop. That process writes ``auto_tiers.json`` only for a set
worth its ``min_gain``; then the model is reloaded as a swap: the new runtime takes new
requests at once, the old one serves its whole queue (each request runs or expires by its
own deadline: none is failed) and closes. A failed apply, or a new set that does not load,
leaves the live set (and ``auto_tiers.json`` as it was) and waits ``min_interval_s`` before
trying again. Clients that pin a tier by name (``tier``, ``min_tier``) get NOT_FOUND for a
name the new set does not have: pin names with auto-tiering only where the set is fixed.
Only the task and the reload run in the server; the server imports no simulator, so the
serving image needs ``sim/`` only as that process's code.

Metrics: ``innfer_tier_set_checks_total{model,outcome}`` (applied, kept, unchanged, waiting,
failed), ``innfer_tier_set_expected_gain{model}`` (the last choice's gain over the live
set) and ``innfer_tier_set_swap_seconds{model}`` (apply process + reload of the last change);
the log says what changed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from runtime.atomic import write_bytes, write_json
from runtime.repository import ACTIVE_FILE, APPLY_KEPT
from runtime.repository.config import AutoTiersConfig
from server.traffic import TrafficLog, drifted, summarise_traffic, write_traffic

log = logging.getLogger("innfer.autotier")

HOST_FILE = "host.json"  # beside traffic.csv: the view sim.live_host reads
APPLY_TIMEOUT_S = 1800.0  # a stuck builder is killed, the live set stays


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
        self.last_change = -float("inf")
        self.changes = 0
        self.chosen_for: dict | None = None  # traffic summary of the last completed choice
        self._task: asyncio.Task | None = None
        self._checking = asyncio.Lock()  # the loop and a caller never check at once

    def start(self) -> None:
        """Start the loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        """Cancel the loop (a running apply process is killed; the live set stays)."""
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Check forever (cancel the task to stop); one failed check never ends the loop."""
        while True:
            await asyncio.sleep(self.goals.rebuild.check_interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the apply timed out, the repository is read-only
                self.last_change = self.clock()  # back off like a failed apply
                log.exception("model %s: auto-tiering check failed", self.name)
                self._count("failed")

    async def check(self) -> str:
        """One check; returns its outcome (applied, kept, unchanged, waiting, failed)."""
        async with self._checking:
            return await self._check()

    async def _check(self) -> str:
        now = self.clock()
        rebuild = self.goals.rebuild
        if now - self.last_change < rebuild.min_interval_s:
            return self._count("waiting")
        # Copied on the loop (the ring changes there), filtered, sorted and summarised off it.
        loop = asyncio.get_running_loop()
        rows, summary = await loop.run_in_executor(
            None, _observed, self.traffic.snapshot(), now, self.goals.window_s
        )
        if summary["requests"] < rebuild.min_requests:
            return self._count("waiting")
        if self.chosen_for is not None and not drifted(self.chosen_for, summary, rebuild.drift):
            return self._count("unchanged")  # the live set was chosen for traffic like this
        work = self.repository / self.name / "auto"
        work.mkdir(parents=True, exist_ok=True)
        traffic, result = work / "traffic.csv", work / "choice.json"
        result.unlink(missing_ok=True)
        rows = tuple(col[-self.goals.simulate_requests :] for col in rows)
        host = self.host() if self.host is not None else None
        await loop.run_in_executor(None, _write_inputs, traffic, rows, work / HOST_FILE, host)
        active = self.repository / self.name / ACTIVE_FILE
        before = active.read_bytes() if active.is_file() else None
        t0 = self.clock()
        argv = self.command(self.repository, self.name, traffic, result, self.live())
        code = await self._apply(argv)
        choice = _read(result)
        if choice is not None:
            self.metrics.tier_set_gain.labels(self.name).set(choice.get("gain", 0.0))
        if code == APPLY_KEPT:
            self.chosen_for = summary
            return self._count("kept")
        if code != 0:
            self.last_change = self.clock()  # back off: the next try waits min_interval_s
            log.error("model %s: `innfer tiers apply` exited %s; the live tiers stay", self.name,
                      code)  # fmt: skip
            return self._count("failed")
        try:
            # Shielded: cancelling this loop (shutdown, new goals) must not cut a swap in
            # half - the old runtime, already out of the data plane, still drains its queue.
            await asyncio.shield(self.reload(self.name))
        except Exception:
            _restore(active, before)  # what is served stays what the file says
            self.last_change = self.clock()
            log.exception("model %s: the new tiers did not load; the live tiers stay", self.name)
            return self._count("failed")
        seconds = self.clock() - t0
        self.last_change = self.clock()
        self.chosen_for = summary
        self.changes += 1
        self.metrics.tier_set_swap_seconds.labels(self.name).set(seconds)
        if choice is not None:
            best, old = choice["best"]["tiers"], choice["current"]["tiers"]
            # A live set that broke the goals is replaced whatever the gain: say why.
            breaks = "; ".join(choice.get("live_breaks") or [])
            log.info(
                "model %s: tiers %s -> %s (expected: served accuracy %+.2f%%, attainment "
                "%+.2f%% on %d recent requests, budgets p50 %.1f ms, %.1f req/s)%s; swapped in "
                "%.1f s",
                self.name, old, best, 100 * choice.get("served_accuracy_gain", 0.0),
                100 * choice.get("attainment_gain", 0.0), choice["traffic"]["requests"],
                choice["traffic"]["budget_ms_p10_p50_p90"][1], choice["traffic"]["rate_per_s"],
                f", replacing a set that broke the goals ({breaks})" if breaks else "", seconds,
            )  # fmt: skip
        return self._count("applied")

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
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        for line in out.decode(errors="replace").splitlines()[-20:]:
            log.info("model %s: tiers apply: %s", self.name, line)
        return proc.returncode

    def _count(self, outcome: str) -> str:
        self.metrics.tier_set_checks.labels(self.name, outcome).inc()
        return outcome


def apply_command(repository: Path, name: str, traffic: Path, result: Path, live: str) -> list:
    """``innfer tiers apply`` in this interpreter (the serving image installs the CLI), with
    the host view written beside the traffic where there is one."""
    host = traffic.with_name(HOST_FILE)
    return [
        sys.executable, "-m", "innfer", "tiers", "apply", str(repository), name,
        "--traffic", str(traffic), "--result", str(result), "--live", live, "--background",
        *(["--host", str(host)] if host.is_file() else []),
    ]  # fmt: skip


def _observed(traffic: TrafficLog, now: float, seconds: float) -> tuple[tuple, dict]:
    """(arrivals, budgets ms, rows) of the last ``seconds`` of ``traffic`` and their
    ``summarise_traffic`` (off the loop: a full ring sorts for tens of milliseconds)."""
    rows = traffic.window(now, seconds)
    return rows, summarise_traffic(*rows)


def _write_inputs(traffic: Path, rows: tuple, host_path: Path, host: dict | None) -> None:
    """The apply process's inputs: the traffic window, and the host view (removed where
    there is none, so that a stale one is never replayed)."""
    write_traffic(traffic, *rows)
    if host is None:
        host_path.unlink(missing_ok=True)
    else:
        write_json(host_path, host)


def _restore(path: Path, content: bytes | None) -> None:
    """Put ``path`` back as it was (``None``: absent)."""
    if content is None:
        path.unlink(missing_ok=True)
    else:
        write_bytes(path, content)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

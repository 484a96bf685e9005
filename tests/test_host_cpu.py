"""The host CPU meter (server/host_cpu.py): the serving process's CPU per arrived row outside
its engines, counted by the planner only where it runs on the engines' CPUs."""

from __future__ import annotations

import pytest

from server.host_cpu import MIN_ROWS, HostCpu, available_cpus


def _window(h: HostCpu, rows: int, engine_s: float, cpu_s: float, now: float) -> None:
    h.arrived(rows)
    h.engine(engine_s)
    h.refresh(cpu_s, now)


def test_per_row_is_process_cpu_less_engine_cpu_over_the_rows_that_arrived():
    h = HostCpu(cpus=1.0)
    h.refresh(10.0, now=0.0)  # opens the first window
    _window(h, 100, engine_s=0.2, cpu_s=10.3, now=1.0)
    assert h.estimate == pytest.approx(0.001)
    # Later windows move the estimate part of the way (an EWMA), not all of it.
    _window(h, 100, engine_s=0.2, cpu_s=10.8, now=2.0)  # 3 ms per row this window
    assert 0.001 < h.estimate < 0.003
    assert h.per_row == h.estimate


def test_a_window_with_too_few_rows_is_extended_not_sampled():
    h = HostCpu(cpus=1.0)
    h.refresh(0.0, now=0.0)
    _window(h, MIN_ROWS - 1, engine_s=0.0, cpu_s=1.0, now=1.0)  # 1 s of CPU for 15 rows
    assert h.estimate == 0.0
    _window(h, 985, engine_s=0.0, cpu_s=1.0, now=2.0)  # 1,000 rows in the same window
    assert h.estimate == pytest.approx(0.001)


def test_it_is_counted_only_where_handling_shares_the_engines_cpus():
    h = HostCpu(cpus=2.0)
    h.refresh(0.0, now=0.0)
    _window(h, 100, engine_s=0.0, cpu_s=0.1, now=1.0)
    assert h.estimate == pytest.approx(0.001)
    assert not h.shares_cpus and h.per_row == 0.0  # one engine thread, a CPU to spare
    h.engine_threads = 2
    assert h.shares_cpus and h.per_row == pytest.approx(0.001)


def test_due_once_per_window():
    h = HostCpu(cpus=1.0, window_s=0.5)
    assert h.due(0.0)
    h.refresh(0.0, now=0.0)
    assert not h.due(0.4) and h.due(0.5)


def test_available_cpus_honours_a_cgroup_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no limit: the affinity
    unlimited = available_cpus(cpu_max)
    assert unlimited >= 1
    cpu_max.write_text("50000 100000\n")  # half a CPU: at least one counts
    assert available_cpus(cpu_max) == 1.0
    cpu_max.write_text("garbage\n")
    assert available_cpus(cpu_max) == unlimited
    assert available_cpus(tmp_path / "missing") == unlimited

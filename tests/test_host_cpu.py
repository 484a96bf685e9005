"""The host CPU meter (server/host_cpu.py): the serving process's CPU per arrived row outside
its engines, counted by the planner only where it runs on the engines' CPUs."""

from __future__ import annotations

import logging

import pytest

import server.host_cpu as host_cpu
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
    cpu_max, no_v1 = tmp_path / "cpu.max", tmp_path / "no-v1"
    cpu_max.write_text("max 100000\n")  # no limit: the affinity
    unlimited = available_cpus(cpu_max, no_v1)
    assert unlimited >= 1
    cpu_max.write_text("50000 100000\n")  # half a CPU: at least one counts
    assert available_cpus(cpu_max, no_v1) == 1.0
    cpu_max.write_text("garbage\n")
    assert available_cpus(cpu_max, no_v1) == unlimited
    assert available_cpus(tmp_path / "missing", no_v1) == unlimited


def _v1(root, quota: int, period: int = 100_000):
    """A fake cgroup v1 CPU controller directory."""
    root.mkdir(exist_ok=True)
    (root / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


def test_available_cpus_honours_a_cgroup_v1_quota(tmp_path, monkeypatch):
    # Only cgroup v2's cpu.max was read: on a cgroup v1 node a pod limited to 1.5 CPUs
    # counted every core of its node, and the planner took its CPUs for the engines' own.
    monkeypatch.setattr(host_cpu.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(host_cpu, "CGROUP_CPU_MAX", tmp_path / "no-v2" / "cpu.max")
    monkeypatch.setattr(host_cpu, "CGROUP_V1_CPU", _v1(tmp_path / "cpu", 150_000), raising=False)
    assert available_cpus() == 1.5
    assert HostCpu().cpus == 1.5  # what the data plane's meter uses
    _v1(tmp_path / "cpu", -1)  # no quota: the affinity
    assert available_cpus() == 8.0
    _v1(tmp_path / "cpu", 20_000)  # a fifth of a CPU: at least one counts
    assert available_cpus() == 1.0
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("garbage\n")
    assert available_cpus() == 8.0
    # cgroup v2 where it is mounted: its cpu.max
    (tmp_path / "no-v2").mkdir()
    (tmp_path / "no-v2" / "cpu.max").write_text("300000 100000\n")
    assert available_cpus() == 3.0


def test_more_engine_threads_than_cpus_warns_once_when_models_load(caplog):
    h = HostCpu(cpus=2.0)
    with caplog.at_level(logging.WARNING, logger="innfer.host_cpu"):
        h.engine_threads = 2  # fits
        h.engine_threads = 4  # as the data plane sets it when a model loads
        h.engine_threads = 4  # a reload: the same count, no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "4 engine threads" in warnings[0] and "2 CPUs" in warnings[0]
    assert "threads in model.yaml" in warnings[0]
    assert h.engine_threads == 4 and h.shares_cpus

"""runtime/priority.py: work run on a lowered thread, and the threads it makes."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from runtime.priority import MAX_NICE, run_lowered

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_run_lowered_returns_the_result_and_threads_it_makes_start_lowered():
    base = _nice()
    if base > MAX_NICE - 3:
        pytest.skip(f"the tests run at nice {base}: no room to lower a thread by 3")
    seen: list[int] = []

    def work() -> str:
        seen.append(_nice())
        child = threading.Thread(target=lambda: seen.append(_nice()))
        child.start()
        child.join()
        return "made"

    assert run_lowered(work, 3, "t") == "made"
    assert seen == [base + 3, base + 3]  # the worker, and the thread it made
    assert _nice() == base  # the caller keeps its own


def test_run_lowered_raises_the_works_error_on_the_caller():
    def boom():
        raise ValueError("no such file")

    with pytest.raises(ValueError, match="no such file"):
        run_lowered(boom, 2, "t")


def test_nothing_lowered_runs_on_the_calling_thread():
    assert run_lowered(threading.get_native_id, 0, "t") == threading.get_native_id()


def test_a_refused_lowering_still_runs_the_work(monkeypatch, caplog):
    """Where the kernel refuses (no room, a seccomp profile), the work runs at the caller's
    priority and the refusal is logged: a load must not fail for it."""

    def refuse(*_):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert run_lowered(lambda: None, 2, "t") is None
    assert "not lowered" in caplog.text

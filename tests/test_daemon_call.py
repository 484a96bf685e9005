"""server/daemon_call.py: blocking looks at the disk that must not hold the process's exit
(a stat of a stalled NFS volume never returns)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.daemon_call import in_daemon_thread

ROOT = Path(__file__).resolve().parents[1]


def test_the_result_and_the_error_come_back_to_the_caller():
    assert asyncio.run(in_daemon_thread(lambda a, b: a + b, 2, 3)) == 5

    def fails():
        raise PermissionError("no")

    with pytest.raises(PermissionError, match="no"):
        asyncio.run(in_daemon_thread(fails))


def test_a_repository_look_that_never_returns_does_not_hold_the_exit(tmp_path):
    # The poller's look ran on asyncio's default executor, whose threads the exit joins:
    # a stat stuck on a stalled volume held a stopped server (here 60 s, on NFS for ever).
    script = textwrap.dedent(f"""
        import asyncio, time
        from pathlib import Path
        from types import SimpleNamespace
        from server import repository_poll

        repository_poll.fingerprint = lambda d: time.sleep(60)  # a stat that never returns
        root = Path({str(tmp_path)!r})
        (root / "m").mkdir()
        plane = SimpleNamespace(config=SimpleNamespace(models=("m",)),
                                repo=SimpleNamespace(root=root, names=lambda: ["m"]))
        poller = repository_poll.RepositoryPoller(plane, 15.0)

        async def main():
            try:
                await asyncio.wait_for(poller.baseline(), 0.5)
            except asyncio.TimeoutError:
                print("stopped waiting", flush=True)

        asyncio.run(main())
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0 and "stopped waiting" in out.stdout, out.stderr
    assert time.monotonic() - t0 < 20  # the process ended without the look


def test_auto_tierings_file_thread_does_not_hold_the_exit(tmp_path):
    # Its calls on the shared volume ran on a ThreadPoolExecutor(1), which the exit joins
    # whatever shutdown(wait=False) says (review 211: a stuck open held it 4 s and on).
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from runtime.repository.config import AutoTiersConfig
        from server.autotier import AutoTierer
        from server.metrics import Metrics
        from server.traffic import TrafficLog

        tierer = AutoTierer("m", Path({str(tmp_path)!r}), AutoTiersConfig(), TrafficLog(),
                            None, Metrics(), lambda: "x", time.monotonic, lambda *a: ["true"])
        tierer._files.submit(time.sleep, 60)  # a call stuck on a stalled volume
        tierer.stop()
        print("returned", flush=True)
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0 and "returned" in out.stdout, out.stderr
    assert time.monotonic() - t0 < 20


def test_the_worker_outlives_a_raising_callback_and_a_failed_thread_start(monkeypatch):
    # Review 212: a done-callback raising a BaseException settled the future twice and
    # killed the worker (every later call hung); a thread that failed to start was kept,
    # never started again.
    import concurrent.futures
    import threading

    from server.daemon_call import DaemonWorker

    worker = DaemonWorker("innfer-test")
    first = worker.submit(time.sleep, 0.2)

    def callback(_):
        raise SystemExit("a callback's exit")

    first.add_done_callback(callback)
    assert worker.submit(lambda: "after").result(10) == "after"
    worker.shutdown()

    real_start, calls = threading.Thread.start, []

    def start_once_fails(self):
        calls.append(self.name)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_fails)
    worker = DaemonWorker("innfer-test-2")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        worker.submit(lambda: None)
    try:
        assert worker.submit(lambda: "started").result(10) == "started"
    except concurrent.futures.TimeoutError:
        pytest.fail("the worker's thread was never started again")
    worker.shutdown()

"""Engine threads: calls run in order off the loop, and CPU engines' threads run below
request handling (server/engine_threads.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest

from runtime.engines.fake import write_model
from runtime.repository import Repository
from server.config import ServerConfig
from server.dataplane import DataPlane
from server.engine_threads import MAX_NICE, EngineThreads, lower_priority
from server.metrics import Metrics
from server.model_runtime import ModelRuntime
from tests.serverutil import add_onnx_model, tiny_cnn

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def _room() -> None:
    """Skip where the suite itself runs so low (``nice -n 15`` and up) that +5 is clamped to
    the kernel's lowest priority: lowered and not lowered would read alike."""
    if _nice() > MAX_NICE - 5:
        pytest.skip(f"the tests run at nice {_nice()}: no room to lower a thread by 5")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_engine_threads_run_their_calls_at_the_lowered_priority():
    _room()
    seen: list[int] = []
    base = _nice()
    threads = EngineThreads(2, "t", nice=3)
    for _ in range(4):
        threads.submit(lambda: seen.append(_nice()))
    threads.shutdown()
    threads.join()
    assert seen == [base + 3] * 4
    assert _nice() == base  # the submitting thread (the loop's) keeps its own


@linux_only
def test_lowering_is_relative_and_stops_at_the_kernels_lowest():
    _room()
    got: list[int | None] = []

    def body():
        got.append(lower_priority(MAX_NICE - 1, "t"))
        got.append(lower_priority(5, "t"))  # a server started under nice keeps the order

    t = threading.Thread(target=body)
    t.start()
    t.join()
    base = _nice()
    assert got == [min(base + MAX_NICE - 1, MAX_NICE), MAX_NICE]


def _engine_nice(tmp_path, engine_nice: int, device: str | None) -> int:
    """The nice value a batch of a fake model ran at on its engine thread."""
    write_model(tmp_path, "m", {"w100": 1.0}, {"w100": {1: 1.0, 4: 1.0}}, max_batch=4)
    served = Repository(tmp_path).load("m", backend="fake")
    seen: list[int] = []
    for engine in served.engines.values():
        if device is not None:
            engine.device = device  # as the torch backend's engines say where they run
        run = engine.run
        engine.run = lambda feeds, run=run: (seen.append(_nice()), run(feeds))[1]

    async def body():
        rt = ModelRuntime(served, Metrics(), engine_nice=engine_nice)  # no inline runs
        rt.start()
        try:
            await rt.infer({"input": np.ones((1, 4), np.float32)}, 1, 1.0)
        finally:
            await rt.stop()

    asyncio.run(asyncio.wait_for(body(), 30))
    assert len(seen) == 1
    return seen[0]


@linux_only
def test_a_cpu_models_batches_run_below_request_handling_a_gpu_models_do_not(tmp_path):
    _room()
    base = _nice()
    assert _engine_nice(tmp_path / "cpu", 5, None) == base + 5
    assert _engine_nice(tmp_path / "off", 0, None) == base
    # A GPU engine's thread launches kernels and waits: delayed, it idles the GPU.
    assert _engine_nice(tmp_path / "gpu", 5, "cuda:0") == base


def test_engine_nice_is_a_server_setting_with_the_kernels_range():
    assert ServerConfig.from_dict({"repository": "r"}).engine_nice == 5
    assert ServerConfig.from_dict({"repository": "r", "engine_nice": 0}).engine_nice == 0
    for bad in (-1, 20, "low", 2.5):
        with pytest.raises(ValueError, match="engine_nice"):
            ServerConfig.from_dict({"repository": "r", "engine_nice": bad})


def _task_nices() -> dict[int, int]:
    """This process's threads: native id -> nice value (/proc/self/task/<tid>/stat, field
    19; the comm field may hold spaces, so fields are counted from its closing paren)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # a thread that ended meanwhile
            continue
        out[int(tid)] = int(fields[16])
    return out


def _two_thread_model(root) -> None:
    config = {"inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
              "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
              "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
              "max_batch": 2, "threads": 2, "spin": False}  # fmt: skip
    add_onnx_model(root, "m", tiny_cnn, config, warmup=1, repeats=1)


@linux_only
@pytest.mark.parametrize("pool_nice", [4, 0])
def test_a_load_makes_each_sessions_pool_thread_at_pool_nice(tmp_path, pool_nice):
    """Exactly the threads the load makes: one pool thread per tier's session (threads: 2),
    at pool_nice below the loading thread, which keeps its own."""
    _room()
    _two_thread_model(tmp_path)
    base, before = _nice(), set(_task_nices())
    served = Repository(tmp_path).load("m", pool_nice=pool_nice)
    made = sorted(n for t, n in _task_nices().items() if t not in before)
    assert made == [base + pool_nice] * 2
    assert _nice() == base
    for engine in served.engines.values():
        engine.close()


@linux_only
@pytest.mark.parametrize("engine_nice", [4, 0])
def test_onnx_runtime_pool_threads_start_at_engine_nice_the_loader_keeps_its_own(
    tmp_path, engine_nice
):
    """threads: 2 - each tier's session makes one intra-op pool thread at load; with
    engine_nice they run below request handling like the thread that calls the engine,
    otherwise one of the engine's two threads kept the loop's priority."""
    _room()
    base = _nice()
    _two_thread_model(tmp_path)
    before = set(_task_nices())

    async def body() -> dict[int, int]:
        server = ServerConfig.from_dict(
            {"repository": str(tmp_path), "engine_nice": engine_nice, "profile_at_load": False}
        )
        plane = DataPlane(server, Metrics())
        await plane.load("m")
        try:
            return {t: n for t, n in _task_nices().items() if t not in before}
        finally:
            await plane.models["m"].stop()

    made = asyncio.run(asyncio.wait_for(body(), 60))
    assert len(made) >= 2  # the two sessions' pool threads, and the loader's pool's
    lowered = [n for n in made.values() if n == base + engine_nice]
    # one pool thread per tier's session (the engine threads start with the first batch)
    assert engine_nice == 0 or len(lowered) == 2
    assert all(n in (base, base + engine_nice) for n in made.values())
    assert _nice() == base

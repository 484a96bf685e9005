"""Outside load on a GPU as a scheduler input: LatencyModel.set_external (pure), the NVML
reader (server/gpu_load.py) and the data plane's wiring from one to the other.

The reader and the wiring run against ``FakeNvml``, a stand-in for the ``pynvml`` module
injected through ``sys.modules``, scripted with utilisations. What a real driver reports is
checked by the tests marked ``gpu`` at the end (skipped without CUDA; run on a lent GPU by
bench/device_check.sh): an idle GPU, another process saturating it, and our own kernels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import sys
import threading
import time
import types

import numpy as np
import pytest

from runtime.engines.fake import write_model
from runtime.repository import Repository
from server.config import ServerConfig
from server.dataplane import DataPlane
from server.gpu_load import NvmlLoad, nvml_handle
from server.metrics import Metrics
from server.scheduling import LatencyModel, TierInfo
from server.scheduling.latency import EXTERNAL_MAX

MS = 1e-3


def model() -> LatencyModel:
    """Two tiers with a measured spread (p50 / p90 / p99), so quantiles are not the median."""
    return LatencyModel(
        [
            TierInfo("w100", 1.0, {1: 2.4, 8: 11.0}, {1: 2.0, 8: 9.0}, {1: 3.0, 8: 14.0}),
            TierInfo("w050", 0.97, {1: 1.3, 8: 5.5}, {1: 1.0, 8: 4.5}),
        ]
    )


def plans(lat: LatencyModel) -> dict:
    """Every number a plan reads: median, quantile, mean, variance per tier and rows, and
    the compiled tables."""
    out = {}
    for tier in lat.tiers:
        for rows in range(1, 9):
            out[tier, rows] = (
                lat.median(tier, rows),
                lat.estimate(tier, rows),
                lat.quantile(tier, rows, 0.9),
                lat.mean(tier, rows),
                lat.var(tier, rows),
            )
    q, mean, var = lat.tables(["w100", "w050"])
    out["tables"] = (q.copy(), mean.copy(), var.copy())
    return out


def same(a: dict, b: dict) -> bool:
    return all(
        np.array_equal(a[k][i], b[k][i]) if k == "tables" else a[k] == b[k]
        for k in a
        for i in range(len(a[k]))
    )


def test_outside_load_moves_plans_at_once_and_batches_learn_only_the_residual():
    """The scripted sequence: external 1 -> today's numbers exactly; 2 -> median and
    quantile double before any batch; batches at 2x the profile under it leave the learned
    factor ~1; back to 1 -> plans back at once (to the learned level's numbers)."""
    today, lat = model(), model()
    lat.tables(["w100", "w050"])  # handed out before the changes: kept current in place
    v0 = lat.version
    assert lat.set_external(1.0) is False and lat.version == v0
    assert same(plans(lat), plans(today))  # bit for bit, tables included

    assert lat.set_external(2.0) is True and lat.version == v0 + 1
    base = plans(today)
    now = plans(lat)
    for key in base:
        if key == "tables":
            continue
        median, estimate, q90, mean, var = now[key]
        assert median == pytest.approx(2 * base[key][0])
        assert estimate == pytest.approx(2 * base[key][1])
        assert q90 == pytest.approx(2 * base[key][2])
        assert mean == pytest.approx(2 * base[key][3])
        assert var == pytest.approx(4 * base[key][4])
    np.testing.assert_allclose(now["tables"][0][:, 1:9], 2 * base["tables"][0][:, 1:9])

    # Batches that run 2x the profile while the outside load says 2: nothing left to learn.
    for k in range(40):
        rows = 1 + k % 8
        lat.observe("w100", rows, 2 * lat.typical("w100", rows))
        today.observe("w100", rows, lat.typical("w100", rows))  # the same, unloaded
    assert lat.factor["w100"] == pytest.approx(1.0, abs=1e-9)
    assert lat.tier_estimate("w100").factor == pytest.approx(1.0, abs=1e-9)
    assert lat.estimate("w100", 4) == pytest.approx(2 * today.estimate("w100", 4))

    # The load goes away: the plans drop at once, to what an unloaded server learned.
    assert lat.set_external(1.0) is True
    assert lat.external == 1.0
    assert same(plans(lat), plans(today))


def test_small_changes_are_ignored_and_the_factor_is_clamped():
    lat = model()
    lat.set_external(2.0)
    v = lat.version
    before = lat.estimate("w050", 8)
    assert lat.set_external(2.03) is False  # 1.5 %: sample noise, no refresh
    assert lat.version == v and lat.estimate("w050", 8) == before and lat.external == 2.0
    assert lat.set_external(2.1) is True and lat.external == 2.1
    # Drift in steps under 2 % still lands: each is compared with the factor in force.
    assert lat.set_external(2.13) is False and lat.set_external(2.16) is True
    assert lat.external == 2.16
    assert lat.set_external(0.5) is True and lat.external == 1.0  # < 1: no outside load
    lat.set_external(1e6)
    assert lat.external == EXTERNAL_MAX
    lat.set_external(1.015)  # within the step of 1: exactly 1, not 1.5 % above today
    assert lat.external == 1.0
    with pytest.raises(ValueError, match="finite"):
        lat.set_external(math.nan)


def test_a_change_of_outside_load_the_batches_saw_first_is_absorbed_by_the_level():
    """Batches show the load before NVML does (the reader samples every 0.5 s): the level
    learns it; once the external factor arrives the level goes back to ~1 within a few
    batches - the overlap double-counts only for those."""
    lat = model()
    for _ in range(20):
        lat.observe("w050", 1, 3 * lat.typical("w050", 1))
    assert lat.factor["w050"] == pytest.approx(3.0, rel=0.01)
    lat.set_external(3.0)
    for _ in range(20):
        lat.observe("w050", 1, 3 * lat.typical("w050", 1))
    assert lat.factor["w050"] == pytest.approx(1.0, rel=0.01)
    assert lat.median("w050", 1) == pytest.approx(3 * lat.typical("w050", 1), rel=0.01)


# -- the NVML reader (server/gpu_load.py) against a stand-in pynvml ---------------------------
class FakeNvml(types.ModuleType):
    """A stand-in for the ``pynvml`` module: no GPU and no NVML on this machine. Tests set
    ``total`` (the device's utilisation, %) and ``samples`` (pid -> SM utilisation %, the
    per-process samples since the last read), or ``process_error`` (an NVML error code)."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.total = 0
        self.samples: dict[int, int] = {}
        self.process_error: int | None = None
        self.calls: list[str] = []
        self.ts = 0
        self.util_threads: set[threading.Thread] = set()  # where the device was read

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, index: int):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        return ("handle", uuid)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.calls.append("util")
        self.util_threads.add(threading.current_thread())
        return types.SimpleNamespace(gpu=self.total, memory=0)

    def nvmlDeviceGetProcessUtilization(self, handle, last_seen):
        if self.process_error is not None:
            raise self.NVMLError(self.process_error)
        self.ts += 1000
        return [
            types.SimpleNamespace(pid=pid, timeStamp=self.ts, smUtil=sm, memUtil=0)
            for pid, sm in self.samples.items()
        ]


OTHER_PID = 1  # init's: never this test process


def test_scripted_utilisations_give_smoothed_factors():
    nvml, seen = FakeNvml(), []
    reader = NvmlLoad(0, lambda i, f: seen.append((i, f)), nvml=nvml, interval_s=3600)
    assert reader.start() is True  # the thread waits an hour: the reads below are ours
    try:
        script = [
            # (total %, our SM %, others' SM %) -> others' share after the EWMA (alpha 0.5)
            (30, 30, 0, 0.0),  # all of it ours: no outside load
            (80, 30, 50, 0.25),  # others 0.5, smoothed from 0
            (80, 30, 50, 0.375),
            (100, 0, 100, 0.6375),  # others 1.0, clipped to 0.9
        ]
        for total, ours, others, want in script:
            nvml.total, nvml.samples = total, {os.getpid(): ours, OTHER_PID: others}
            assert reader.sample() == pytest.approx(1 / (1 - want))
        assert [i for i, _ in seen] == [0] * 4
        assert [f for _, f in seen] == pytest.approx([1 / (1 - w) for *_, w in script])
        # Nobody ran a kernel since the last read (NVML: NOT_FOUND): our share is 0.
        nvml.process_error, nvml.total = nvml.NVML_ERROR_NOT_FOUND, 0
        assert reader.sample() == pytest.approx(1 / (1 - 0.6375 / 2))
    finally:
        reader.stop()
    assert nvml.calls[0] == "init" and nvml.calls[-1] == "shutdown"


class HistoryNvml(FakeNvml):
    """NVML's per-process answer as a real driver gives it: one sample per process, its SM
    utilisation averaged over the buffered samples newer than ``last_seen``. ``history``:
    (timestamp, pid, SM %) entries, oldest first."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, int, int]] = []

    def nvmlDeviceGetProcessUtilization(self, handle, last_seen):
        newer = [(ts, pid, sm) for ts, pid, sm in self.history if ts > last_seen]
        if not newer:
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return [
            types.SimpleNamespace(
                pid=pid, smUtil=int(np.mean([sm for _, p, sm in newer if p == pid])),
                timeStamp=max(ts for ts, p, _ in newer if p == pid), memUtil=0,
            )
            for pid in dict.fromkeys(p for _, p, _ in newer)
        ]  # fmt: skip


def test_samples_from_before_the_reader_started_are_not_read_as_ours():
    # Seen on an H200: the first read (from timestamp 0) averaged our share over seconds we
    # were idle, so our own saturating kernels read as others' - factor 10 at once.
    nvml, seen = HistoryNvml(), []
    me = os.getpid()
    nvml.history = [(t, me, 0) for t in range(1, 10)] + [(t, OTHER_PID, 90) for t in (1, 2)]
    reader = NvmlLoad(0, lambda i, f: seen.append(f), nvml=nvml, interval_s=3600)
    assert reader.start()
    try:
        nvml.history += [(10, me, 95), (11, me, 95)]  # our kernels, since the start
        nvml.total = 95
        assert reader.sample() == pytest.approx(1.0)
    finally:
        reader.stop()


def _clocked_reader():
    """A started reader on a fake NVML, read by hand (``sample``) on a scripted clock, with
    our engines' busy seconds as given: (nvml, factors reported, [now], [busy], reader)."""
    nvml, seen, now, busy = FakeNvml(), [], [0.0], [0.0]
    reader = NvmlLoad(
        0, lambda i, f: seen.append(f), own_busy=lambda: busy[0], nvml=nvml,
        interval_s=3600, clock=lambda: now[0],
    )  # fmt: skip
    assert reader.start()
    return nvml, seen, now, busy, reader


def test_without_our_own_samples_the_engines_busy_time_stands_in():
    """In a container NVML reports host PIDs: our samples never match os.getpid(). The
    data plane's engine seconds say how busy we were; with neither, nothing is reported."""
    nvml, seen, now, busy, reader = _clocked_reader()
    try:
        nvml.process_error = nvml.NVML_ERROR_NOT_SUPPORTED
        nvml.total = 90
        assert reader.sample() is None and seen == []  # first read: no busy rate yet
        now[0], busy[0] = 1.0, 0.4  # our engines ran 40 % of the last second
        assert reader.sample() == pytest.approx(2.0)  # others 0.9 - 0.4
        # NVML's samples see only a stranger (the host PID of this very process) at 20 %:
        # the larger own share, 0.4, wins - our work never counts as outside load.
        nvml.process_error, nvml.samples = None, {OTHER_PID: 20}
        now[0], busy[0] = 2.0, 0.8
        assert reader.sample() == pytest.approx(2.0)
    finally:
        reader.stop()


def test_in_a_container_our_own_kernels_never_read_as_outside_load():
    # NVML names processes by their host PID: in a container no sample is ever ours, and
    # "only others have samples" read as a share of 0 - our own 90 % counted as outside
    # load, factor 10 at the first read and 1.8 after the busy counter went back (a model
    # unloaded). Until a sample carries our PID, NVML's share is unknown (review
    # helper-289).
    nvml, seen, now, busy, reader = _clocked_reader()
    try:
        nvml.total, nvml.samples = 90, {OTHER_PID: 90}  # this process, under its host PID
        assert reader.sample() is None and seen == []  # was 10.0
        now[0], busy[0] = 1.0, 0.9  # our engines ran 90 % of the last second
        assert reader.sample() == pytest.approx(1.0)
        now[0], busy[0] = 2.0, 0.5  # the counter went back (a model unloaded)
        assert reader.sample() is None  # was 1.82
        now[0], busy[0] = 3.0, 1.4
        assert reader.sample() == pytest.approx(1.0)
        assert seen == [pytest.approx(1.0)] * 2
    finally:
        reader.stop()


def test_a_device_whose_utilisation_nvml_cannot_read_starts_no_reader(caplog):
    # A MIG slice: NOT_SUPPORTED. The reader started anyway, failed every read with a
    # warning and polled every 0.5 s for the model's life (review helper-289).
    class MigNvml(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle):
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    caplog.set_level(logging.INFO, logger="innfer.gpu_load")
    reader = NvmlLoad(0, lambda i, f: None, nvml=MigNvml(), interval_s=0.01)
    assert reader.start() is False and reader._thread is None
    assert "cannot read its utilisation" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nvml_missing_or_failing_disables_the_reader_without_raising(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="innfer.gpu_load")
    broken = FakeNvml(fail_init=True)
    reader = NvmlLoad(0, lambda i, f: None, nvml=broken)
    assert reader.start() is False and reader._thread is None
    reader.stop()  # harmless
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the package is not installed
    assert NvmlLoad(0, lambda i, f: None).start() is False
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert "NVML unavailable" in caplog.text


def test_the_thread_samples_until_stopped():
    nvml, seen = FakeNvml(), []
    nvml.total, nvml.samples = 50, {os.getpid(): 0, OTHER_PID: 50}
    reader = NvmlLoad(3, lambda i, f: seen.append((i, f)), nvml=nvml, interval_s=0.01)
    assert reader.start()
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread = reader._thread
    reader.stop()
    assert not thread.is_alive()
    assert seen[0] == (3, pytest.approx(2.0))
    count = len(seen)
    time.sleep(0.05)
    assert len(seen) == count  # no read after stop()


def test_cuda_visible_devices_maps_cuda_indices_to_nvml_handles(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-abc")
    assert nvml_handle(nvml, 0) == ("handle", 2)
    assert nvml_handle(nvml, 1) == ("handle", "GPU-abc")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_handle(nvml, 1) == ("handle", 1)


# -- the wiring: data plane -> every scheduler on the device, on the loop -------------------
@pytest.fixture
def gpu_config(tmp_path, monkeypatch):
    """Model 'gpu' on fake engines that say they run on cuda:0 (the fake backend has no
    device: the attribute is set after loading, as a torch CUDA engine carries it), and
    model 'cpu' on plain fake engines; pynvml is the stand-in."""
    write_model(tmp_path, "gpu", {"w100": 1.0, "w050": 0.5}, max_batch=4)
    write_model(tmp_path, "cpu", {"w100": 1.0}, max_batch=2)
    load = Repository.load

    def on_cuda(self, name, **kw):
        served = load(self, name, **kw)
        if name == "gpu":
            for engine in served.engines.values():
                engine.device = "cuda:0"
        return served

    monkeypatch.setattr(Repository, "load", on_cuda)
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    cfg = ServerConfig.from_dict({"repository": str(tmp_path), "profile_at_load": False})
    return dataclasses.replace(cfg, backend="fake"), nvml


def _externals(plane: DataPlane, name: str) -> set[float]:
    return {lane.latency.external for lane in plane.models[name].lanes.values()}


def test_the_factor_reaches_every_scheduler_on_the_gpu_on_the_loop(gpu_config, monkeypatch):
    config, nvml = gpu_config
    # The data plane's reader reads every 10 ms here rather than every POLL_S.
    monkeypatch.setattr("server.gpu_load.POLL_S", 0.01)
    nvml.total, nvml.samples = 75, {OTHER_PID: 75}  # others hold 3/4 of the GPU: 4x
    applied_on: list[threading.Thread] = []

    async def body():
        plane = DataPlane(config, Metrics())
        apply = plane._apply_external

        def on_loop(*args):
            applied_on.append(threading.current_thread())
            apply(*args)

        plane._apply_external = on_loop
        await plane.load_all()
        try:
            assert list(plane._gpu_readers) == [0]  # one reader, for cuda:0 only
            for _ in range(500):
                if _externals(plane, "gpu") == {4.0}:
                    break
                await asyncio.sleep(0.01)
            assert _externals(plane, "gpu") == {4.0}
            assert _externals(plane, "cpu") == {1.0}  # a CPU model is not touched
            gauge = plane.metrics.registry.get_sample_value(
                "innfer_device_external_load_factor", {"device": "cuda:0"}
            )
            assert gauge == pytest.approx(4.0)
            reader = plane._gpu_readers[0]
        finally:
            await plane.stop_models()
        assert reader._thread is None and nvml.calls[-1] == "shutdown"
        assert set(applied_on) == {threading.main_thread()}  # the loop's, never the reader's
        # NVML started (its first read of the device) off the loop: on it, every other
        # model's requests waited for the driver (session 71's noticed list)
        assert nvml.util_threads and threading.main_thread() not in nvml.util_threads

    asyncio.run(asyncio.wait_for(body(), 30))


def test_cpu_only_or_switched_off_makes_no_reader(gpu_config, tmp_path):
    config, nvml = gpu_config

    async def body(cfg, names):
        plane = DataPlane(dataclasses.replace(cfg, models=names), Metrics())
        await plane.load_all()
        try:
            return dict(plane._gpu_readers)
        finally:
            await plane.stop_models()

    assert asyncio.run(body(config, ["cpu"])) == {}
    assert asyncio.run(body(dataclasses.replace(config, nvml_load=False), ["gpu"])) == {}
    # No reader made, started or stopped (server.metrics' utilisation gauges initialise
    # NVML themselves where it imports, as before: those are the "init" calls).
    assert "shutdown" not in nvml.calls and "util" not in nvml.calls


def test_unloading_the_last_model_on_a_gpu_stops_its_reader(gpu_config, monkeypatch):
    # The reader went on reading NVML every POLL_S until shutdown, and its factor and gauge
    # stayed, after the GPU's last model was unloaded; a reload keeps it (the successor is
    # there), a model loaded there again starts a fresh one.
    config, nvml = gpu_config
    monkeypatch.setattr("server.gpu_load.POLL_S", 0.01)
    nvml.total, nvml.samples = 50, {OTHER_PID: 50}  # 2x

    async def reported(plane):
        for _ in range(500):
            if plane.external_load.get(0) is not None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no factor reported")

    async def body():
        plane = DataPlane(config, Metrics())
        await plane.load_all()
        try:
            first = plane._gpu_readers[0]
            await reported(plane)
            await plane.load("gpu")  # a reload: the successor runs on the GPU
            assert plane._gpu_readers[0] is first and first._thread is not None
            await plane.unload("gpu")
            for _ in range(500):  # stopped off the loop
                if first._thread is None:
                    break
                await asyncio.sleep(0.01)
            gauge = plane.metrics.registry.get_sample_value(
                "innfer_device_external_load_factor", {"device": "cuda:0"}
            )
            state = (first._thread, dict(plane._gpu_readers), dict(plane.external_load), gauge)
            plane._apply_external(0, 3.0, first)  # a report still queued from it: dropped
            assert plane.external_load == {}
            await plane.load("gpu")  # loaded there again: a fresh reader
            fresh = plane._gpu_readers[0]
            return state, fresh is not first and fresh._thread is not None
        finally:
            await plane.stop_models()

    state, fresh = asyncio.run(asyncio.wait_for(body(), 30))
    assert state == (None, {}, {}, None) and fresh


# -- the real driver (gpu: skipped without CUDA; run by bench/device_check.sh) ---------------
_BURN = """
import sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
"""


def _real_factors(seconds: float, own_busy=None) -> list[float]:
    """The factors a reader on the real NVML of GPU 0 reports over ``seconds``."""
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the gpu extra)")
    seen: list[float] = []
    reader = NvmlLoad(0, lambda _i, f: seen.append(f), own_busy=own_busy, interval_s=0.2)
    assert reader.start(), "NVML did not start on a machine with a GPU"
    try:
        time.sleep(seconds)
    finally:
        reader.stop()
    return seen


@pytest.mark.gpu
def test_real_nvml_reads_an_idle_gpu_as_no_outside_load():
    factors = _real_factors(1.5, own_busy=lambda: 0.0)  # we run nothing either
    assert len(factors) >= 4, factors
    assert max(factors) < 1.25, factors


@pytest.mark.gpu
def test_real_nvml_sees_another_process_saturate_the_gpu():
    """Another process's matrix products (a training job beside the server) must raise the
    factor at once: our engines are idle, so all of the utilisation is others'."""
    import subprocess

    burn = subprocess.Popen([sys.executable, "-c", _BURN, "8"], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert burn.stdout.readline().strip() == "ready"
        factors = _real_factors(2.5, own_busy=lambda: 0.0)
    finally:
        burn.kill()
        burn.wait()
    assert len(factors) >= 6, factors
    assert factors[-1] > 3.0, factors  # others hold > 2/3 of the device after 2 s


@pytest.mark.gpu
def test_real_nvml_does_not_count_our_own_kernels_as_outside_load():
    """The same products run by this process, with ``own_busy`` unknown: NVML's per-process
    samples must name our PID, or the reader would slow plans the more we serve. Where the
    driver cannot say (no per-process samples, as in some containers) nothing is reported,
    which is also correct."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    stop = threading.Event()

    def burn():
        while not stop.is_set():
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()

    worker = threading.Thread(target=burn, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)
        factors = _real_factors(2.5)
    finally:
        stop.set()
        worker.join(10)
    if not factors:  # (an empty list would pass the check below without checking anything)
        pytest.skip("this driver gives no per-process samples: nothing to check")
    assert all(f < 1.5 for f in factors), factors


class _FakeNvmlDevices(FakeNvml):
    """FakeNvml with ``count`` GPUs whose memory reads its NVML index in bytes;
    utilisation is NOT_SUPPORTED (a MIG slice's) where ``mig``."""

    def __init__(self, count: int, mig: bool = False) -> None:
        super().__init__()
        self.count, self.mig = count, mig

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.mig:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=40, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=float(handle[1]))


def _gauges(collector) -> dict[str, dict[str, float]]:
    return {f.name: {s.labels["gpu"]: s.value for s in f.samples} for f in collector.collect()}


def test_gpu_gauges_are_the_visible_gpus_by_cuda_index(monkeypatch):
    # NVML ignores CUDA_VISIBLE_DEVICES: with it at "2" the GPU in use was labelled "2" (the
    # external-load factor calls it 0) and the host's other GPUs were exported too; a MIG
    # slice's unsupported utilisation dropped its memory gauge as well (review helper-231).
    from server.metrics import _NvmlCollector

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    got = _gauges(_NvmlCollector(_FakeNvmlDevices(4)))
    assert got["innfer_gpu_memory_used_bytes"] == {"0": 2.0}  # NVML's GPU 2, as cuda:0
    assert got["innfer_gpu_utilization_ratio"] == {"0": 0.4}
    got = _gauges(_NvmlCollector(_FakeNvmlDevices(4, mig=True)))
    assert got["innfer_gpu_memory_used_bytes"] == {"0": 2.0}  # memory reads on
    assert got["innfer_gpu_utilization_ratio"] == {}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    got = _gauges(_NvmlCollector(_FakeNvmlDevices(2)))
    assert got["innfer_gpu_memory_used_bytes"] == {"0": 0.0, "1": 1.0}  # every GPU


def test_a_gpu_model_and_a_cpu_model_have_an_arbiter_each(gpu_config):
    """One arbiter for every model: a CPU model's batch took the GPU model's only slot
    (device_slots 1), each planning behind the other's work (review helper-254)."""
    config, _ = gpu_config

    async def body():
        plane = DataPlane(config, Metrics())
        await plane.load_all()
        try:
            gpu, cpu = plane.models["gpu"].device, plane.models["cpu"].device
            return gpu is not cpu, gpu.name, cpu is plane.device, gpu.slots, cpu.slots
        finally:
            await plane.stop_models()

    assert asyncio.run(body()) == (True, "cuda:0", True, 1, 1)

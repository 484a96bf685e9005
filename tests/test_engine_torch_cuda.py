"""The torch backend's CUDA graphs: one graph per input shape, captured lazily, replayed after.

The ``gpu`` test runs the real thing and skips without CUDA. On CPU: the engine never touches
CUDA graphs, the switches are honoured, and the capture/replay bookkeeping is checked against
a FAKE of the few ``torch.cuda`` graph calls the engine makes (CUDA cannot run here).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import fx, nn

from runtime.engines.base import BuildOptions, TensorSpec
from runtime.engines.torch import (
    CUDA_GRAPHS_ENV,
    MODULE_SPEC,
    MODULE_WEIGHTS,
    TorchBackend,
    TorchEngine,
    cuda_graphs_enabled,
)
from runtime.inn import graphio

IN_F, OUT_F = 12, 5


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_F, 32), nn.ReLU(), nn.Linear(32, OUT_F)).eval()


def _save_tier(d, net: nn.Module) -> None:
    """A tier as the build writes it for the torch backend: module.json + safetensors."""
    gm = fx.symbolic_trace(net)
    meta = {
        "architecture": graphio.to_spec(gm),
        "inputs": [["input", "float32", [-1, IN_F]]],
        "outputs": [["logits", "float32", [-1, OUT_F]]],
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / MODULE_SPEC).write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in gm.state_dict().items()}, str(d / MODULE_WEIGHTS))


def _x(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, IN_F)).astype(np.float32)


@torch.no_grad()
def _expected(net: nn.Module, x: np.ndarray) -> np.ndarray:
    return net(torch.from_numpy(x)).numpy()


# --- CPU: no CUDA graphs, ever -------------------------------------------------------------


def test_cpu_engine_never_uses_cuda_graphs(tmp_path, monkeypatch):
    class Forbidden:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("a CUDA graph was created for a CPU engine")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Forbidden)
    monkeypatch.setattr(torch.cuda, "graph", Forbidden)
    net = _net()
    _save_tier(tmp_path / "tier", net)
    engine = TorchBackend().load(tmp_path / "tier", BuildOptions(max_batch=4))
    assert engine.device == "cpu"
    for batch, seed in ((1, 0), (3, 1), (3, 2), (9, 3)):  # 9 > max_batch: still just eager
        x = _x(batch, seed)
        np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x))
    assert engine.graph_captures == 0 and engine.captured_batches == []
    assert engine.slow_first_shapes is False  # no batch-size warm-up at load on a CPU


def test_cuda_graphs_switches(monkeypatch):
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert cuda_graphs_enabled(BuildOptions()) is True
    assert cuda_graphs_enabled(BuildOptions(extra={"cuda_graphs": False})) is False
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(CUDA_GRAPHS_ENV, off)
        assert cuda_graphs_enabled(BuildOptions()) is False
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    assert cuda_graphs_enabled(BuildOptions()) is True


# --- CPU: the capture/replay bookkeeping against a FAKE torch.cuda -------------------------


class _FakeGraph:
    """FAKE torch.cuda.CUDAGraph: replay() re-runs what was recorded during capture and
    writes the results into the tensors the capture returned, as a real replay does."""

    def __init__(self) -> None:
        self.recorded = None  # (module, static args, static outputs)
        self.replays = 0

    def replay(self) -> None:
        module, args, out = self.recorded
        out.copy_(module.inner(*args))
        self.replays += 1
        _FakeCuda.seen.append(("replay", _FakeCuda.current_device))


class _Recorder(nn.Module):
    """Wraps the tier; during a FAKE capture it records the call on the graph."""

    capturing: _FakeGraph | None = None

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        what = "capture" if _Recorder.capturing is not None else "forward"
        _FakeCuda.seen.append((what, _FakeCuda.current_device, _FakeCuda.current_stream))
        if _Recorder.capturing is not None:
            _Recorder.capturing.recorded = (self, (x,), out)
        return out


class _FakeStream:
    """FAKE torch.cuda.Stream: remembers the device it was made on."""

    def __init__(self, device=None) -> None:
        self.device = device

    def wait_stream(self, other) -> None:
        pass


class _FakeCuda:
    """The torch.cuda calls the engine makes to capture, on CPU tensors. It keeps a
    current device and stream as torch does per thread; ``seen`` records, for every forward
    of the module and every replay, the device (and stream) current then."""

    # The thread's current device before the engine sets its own: another GPU's.
    THREAD_DEVICE = "cuda:0 (the thread's current device)"
    current_device = THREAD_DEVICE
    current_stream = None  # None: the device's default stream
    seen: ClassVar[list[tuple]] = []

    def __init__(self, fail_batches=()) -> None:
        self.fail_batches = set(fail_batches)
        self.graphs: list[_FakeGraph] = []
        self.modes: list[str] = []
        self.streams: list[_FakeStream] = []  # every torch.cuda.Stream made
        self.capture_streams: list = []  # torch.cuda.graph's stream= per capture
        self.capture_devices: list = []  # the current device as each capture began

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(_FakeCuda, "current_device", _FakeCuda.THREAD_DEVICE)
        monkeypatch.setattr(_FakeCuda, "current_stream", None)
        monkeypatch.setattr(_FakeCuda, "seen", [])
        monkeypatch.setattr(torch.cuda, "Stream", self._new_stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream(device))
        monkeypatch.setattr(torch.cuda, "stream", self._use_stream)
        monkeypatch.setattr(torch.cuda, "device", self._use_device)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self._new_graph)
        monkeypatch.setattr(torch.cuda, "graph", self._capture)

    def _new_stream(self, device=None) -> _FakeStream:
        self.streams.append(_FakeStream(device))
        return self.streams[-1]

    @staticmethod
    @contextlib.contextmanager
    def _use_stream(stream):
        before, _FakeCuda.current_stream = _FakeCuda.current_stream, stream
        try:
            yield
        finally:
            _FakeCuda.current_stream = before

    @staticmethod
    @contextlib.contextmanager
    def _use_device(device):
        before, _FakeCuda.current_device = _FakeCuda.current_device, device
        try:
            yield
        finally:
            _FakeCuda.current_device = before

    def _new_graph(self) -> _FakeGraph:
        self.graphs.append(_FakeGraph())
        return self.graphs[-1]

    @contextlib.contextmanager
    def _capture(self, graph, pool=None, stream=None, capture_error_mode="global"):
        assert pool == "pool"
        self.modes.append(capture_error_mode)
        self.capture_streams.append(stream)
        self.capture_devices.append(_FakeCuda.current_device)
        _Recorder.capturing = graph
        try:
            # torch.cuda.graph makes ``stream`` (default: a process-wide one) current.
            with self._use_stream(stream if stream is not None else "process-wide stream"):
                yield
            if graph.recorded[1][0].shape[0] in self.fail_batches:
                raise RuntimeError("operation not permitted when stream is capturing")
        finally:
            _Recorder.capturing = None


def _graph_engine(net: nn.Module, max_batch: int = 4) -> TorchEngine:
    engine = TorchEngine(
        _Recorder(net),
        "cpu",
        torch.float32,
        [TensorSpec("input", "float32", (-1, IN_F))],
        [TensorSpec("logits", "float32", (-1, OUT_F))],
        max_batch=max_batch,
    )
    engine._use_graphs = True  # as on a CUDA device; the fake stands in for torch.cuda
    return engine


def test_one_graph_per_batch_size_captured_lazily_then_replayed(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    net = _net()
    engine = _graph_engine(net, max_batch=4)

    assert engine.slow_first_shapes  # the server runs every batch size once at load
    x = _x(1, 0)
    np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x), rtol=1e-6)
    assert engine.graph_captures == 1 and engine.captured_batches == [1]
    # Same batch size, new values: no capture, the values reach the graph through its inputs.
    x = _x(1, 1)
    np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x), rtol=1e-6)
    assert engine.graph_captures == 1 and fake.graphs[0].replays == 2
    x = _x(3, 2)
    np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x), rtol=1e-6)
    assert engine.captured_batches == [1, 3]
    # Beyond max_batch: eager, no graph (memory stays bounded by 1..max_batch).
    x = _x(6, 4)
    np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x), rtol=1e-6)
    assert engine.captured_batches == [1, 3] and len(fake.graphs) == 2
    assert set(fake.modes) == {"thread_local"}  # other engines' threads may run meanwhile
    engine.close()
    assert engine.captured_batches == []


def test_capture_and_replay_run_on_the_engines_device_and_its_own_stream(monkeypatch):
    # An engine on "cuda:1" driven from a thread whose current device is 0: torch.cuda.graph
    # captured on its process-wide stream, made on the current device, while the module's
    # kernels ran on device 1 - an empty graph (a warning only), stale outputs on replay
    # (review 125). Warm-up, capture and replay now run with the engine's device current,
    # and the capture on a stream the engine made on that device. (FAKE torch.cuda: the
    # engine's device is "cpu" here, the thread's current device another one.)
    fake = _FakeCuda()
    fake.install(monkeypatch)
    net = _net()
    engine = _graph_engine(net, max_batch=4)
    own = torch.device(engine.device)
    assert own != _FakeCuda.THREAD_DEVICE
    for batch, seed in ((2, 0), (2, 1), (3, 2)):  # capture, replay, capture
        x = _x(batch, seed)
        np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x),
                                   rtol=1e-6)  # fmt: skip
    assert engine.graph_captures == 2
    # Every warm-up forward, capture and replay saw the engine's device as the current one.
    assert [s[0] for s in _FakeCuda.seen].count("capture") == 2
    assert [s[0] for s in _FakeCuda.seen].count("replay") == 3
    assert {s[1] for s in _FakeCuda.seen} == {own}, _FakeCuda.seen
    assert fake.capture_devices == [own, own]
    # One stream of the engine's own, made on its device, for warm-up and capture alike.
    (stream,) = fake.streams
    assert stream.device == own
    assert fake.capture_streams == [stream, stream]
    assert {s[2] for s in _FakeCuda.seen if s[0] != "replay"} == {stream}
    assert _FakeCuda.current_device == _FakeCuda.THREAD_DEVICE  # restored after each run


class _SumTokens(nn.Module):
    """(batch, length) -> (batch, 1): a sequence model's shape, any length."""

    def forward(self, x):
        return x.sum(dim=1, keepdim=True)


def test_a_sequence_model_gets_a_graph_per_batch_and_length_within_a_bound(monkeypatch):
    # The server pads a text batch to its lane's length for this engine
    # (prefers_fixed_lengths), so (batch, length) shapes repeat and their graphs replay.
    from runtime.engines.torch import MAX_LENGTHS

    fake = _FakeCuda()
    fake.install(monkeypatch)
    net = _SumTokens()
    engine = TorchEngine(_Recorder(net), "cpu", torch.float32,
                         [TensorSpec("ids", "float32", (-1, -1))],
                         [TensorSpec("y", "float32", (-1, 1))], max_batch=1)  # fmt: skip
    assert engine.prefers_fixed_lengths is False  # on a CPU: no graphs, any length is fine
    engine._use_graphs = True
    assert engine.prefers_fixed_lengths is True

    def run(length: int, seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((1, length)).astype(np.float32)
        np.testing.assert_allclose(engine.run({"ids": x})["y"], x.sum(1, keepdims=True),
                                   rtol=1e-5)  # fmt: skip

    run(8, 0)
    run(8, 1)  # the same shape again: replayed, not captured
    run(16, 2)
    assert engine.captured_shapes == [((1, 8),), ((1, 16),)] and engine.graph_captures == 2
    assert fake.graphs[0].replays == 2
    for length in range(17, 17 + MAX_LENGTHS):  # lengths nobody padded: bounded, then eager
        run(length, length)
    assert engine.graph_captures == MAX_LENGTHS  # at most MAX_LENGTHS lengths per batch size
    assert engine.captured_batches == [1]
    engine.max_batch = 2
    x = np.ones((2, 8), np.float32)  # another batch size has lengths of its own
    np.testing.assert_allclose(engine.run({"ids": x})["y"], x.sum(1, keepdims=True))
    assert engine.captured_batches == [1, 2] and engine.graph_captures == MAX_LENGTHS + 1


def test_failed_capture_falls_back_to_eager_and_logs_once(monkeypatch, caplog):
    fake = _FakeCuda(fail_batches={2})
    fake.install(monkeypatch)
    net = _net()
    engine = _graph_engine(net, max_batch=4)
    engine.run({"input": _x(1, 0)})  # captured before the failure
    with caplog.at_level(logging.WARNING, logger="innfer.engines.torch"):
        for batch, seed in ((2, 1), (2, 2), (4, 3)):
            x = _x(batch, seed)
            got = engine.run({"input": x})["logits"]
            np.testing.assert_allclose(got, _expected(net, x), rtol=1e-6)
    assert caplog.text.count("CUDA graph capture failed") == 1
    assert engine.captured_batches == [1]  # no further capture attempts after the failure
    assert engine.prefers_fixed_lengths is False  # padding would buy no replay now
    assert engine.slow_first_shapes is False  # nothing left to capture at load either
    assert len(fake.graphs) == 2  # batch 1's and the failed one; none for batch 4
    x = _x(1, 5)  # the graph captured earlier keeps replaying
    np.testing.assert_allclose(engine.run({"input": x})["logits"], _expected(net, x), rtol=1e-6)
    assert fake.graphs[0].replays == 2


def test_capture_gate_waits_for_runs_and_holds_new_runs_behind_it():
    """A capture starts only once running batches finish, and a run that arrives while a
    capture waits goes after it (a busy server cannot starve a capture)."""
    import threading

    from runtime.engines.torch import _CaptureGate

    gate, order = _CaptureGate(), []
    release_run = threading.Event()

    def running():
        with gate.shared():
            order.append("run-1 started")
            release_run.wait(5)
            order.append("run-1 done")

    def capture():
        with gate.exclusive():
            order.append("capture")

    def late_run():
        with gate.shared():
            order.append("run-2")

    threads = [threading.Thread(target=f) for f in (running, capture, late_run)]
    threads[0].start()
    while not order:
        pass
    threads[1].start()
    while gate._waiting == 0:  # the capture is queued behind run-1
        pass
    threads[2].start()
    release_run.set()
    for t in threads:
        t.join(5)
    assert order == ["run-1 started", "run-1 done", "capture", "run-2"]


# --- gpu: real CUDA graphs -----------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA")
    net = _net()
    _save_tier(tmp_path / "tier", net)
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    extra = {"device": "cuda"}
    graphs = TorchBackend().load(tmp_path / "tier", BuildOptions(max_batch=4, extra=extra))
    eager = TorchBackend().load(
        tmp_path / "tier", BuildOptions(max_batch=4, extra={**extra, "cuda_graphs": False})
    )
    results = {}
    for batch in (1, 3):
        for seed in (batch, batch + 10):  # the second call of a batch size replays
            x = _x(batch, seed)
            got = graphs.run({"input": x})["logits"]
            np.testing.assert_allclose(got, eager.run({"input": x})["logits"], rtol=1e-5)
            np.testing.assert_allclose(got, _expected(net, x), rtol=1e-4, atol=1e-5)
            results[seed] = (x, got)
    # Results are copies: later replays of the same graph left the earlier ones alone.
    for x, got in results.values():
        np.testing.assert_allclose(got, _expected(net, x), rtol=1e-4, atol=1e-5)
    assert graphs.captured_batches == [1, 3]
    assert graphs.graph_captures == 2  # one per batch size: the repeats replayed
    assert eager.graph_captures == 0


@pytest.mark.gpu
def test_cuda_graphs_capture_and_replay_while_other_engines_run(tmp_path, monkeypatch):
    """Engine threads capture while other engines run (eagerly or replaying) in other
    threads - the server's situation: capture_error_mode="thread_local" must keep their
    work out of the capture, and every answer must be this batch's own."""
    import threading

    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA")
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    nets, engines = [], []
    for k, graphs in enumerate((True, True, False)):  # two capturing, one eager
        torch.manual_seed(k)
        net = nn.Sequential(nn.Linear(IN_F, 64), nn.ReLU(), nn.Linear(64, OUT_F)).eval()
        _save_tier(tmp_path / f"t{k}", net)
        options = BuildOptions(max_batch=8, extra={"device": "cuda", "cuda_graphs": graphs})
        nets.append(net)
        engines.append(TorchBackend().load(tmp_path / f"t{k}", options))
    errors: list[BaseException] = []

    def work(k: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                x = _x(int(rng.integers(1, 9)), int(rng.integers(1 << 30)))
                got = engines[k].run({"input": x})["logits"]
                np.testing.assert_allclose(got, _expected(nets[k], x), rtol=1e-4, atol=1e-4)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k % 3, k)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert engines[0].graph_captures == len(engines[0].captured_batches) > 1
    assert engines[2].graph_captures == 0


@pytest.mark.gpu
def test_fp16_graphs_take_and_give_fp32(tmp_path, monkeypatch):
    """An fp16 engine's graphs take the request's fp32 rows (the copy into the static input
    converts) and answer fp32, close to the fp32 model, at every batch size it serves."""
    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA")
    net = _net()
    _save_tier(tmp_path / "tier", net)
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    options = BuildOptions(max_batch=8, precision="fp16", extra={"device": "cuda"})
    engine = TorchBackend().load(tmp_path / "tier", options)
    for batch in (8, 1, 5, 8, 1):
        x = _x(batch, 100 + batch)
        got = engine.run({"input": x})["logits"]
        assert got.dtype == np.float32 and got.shape == (batch, OUT_F)
        np.testing.assert_allclose(got, _expected(net, x), rtol=2e-2, atol=2e-2)
    assert engine.captured_batches == [1, 5, 8]


def test_the_device_named_is_the_one_the_engines_load_on(monkeypatch):
    # The engines load on "cuda", the current device; the name (the profile's device) was
    # GPU 0's whatever the current device was.
    names = {0: "NVIDIA A10", 1: "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: names[i or 0])
    assert TorchBackend().device() == "NVIDIA H200"


def test_a_bare_cuda_is_pinned_to_the_loading_threads_gpu_and_a_full_one_is_an_engine_error(
    tmp_path, monkeypatch
):
    # "cuda" stayed bare: the engine threads (current device 0) put each batch's inputs on
    # GPU 0 beside a module on the loading thread's GPU; and a GPU too full for the module
    # raised torch's OutOfMemoryError past the cache's EngineError path (review helper-268).
    # No GPU here: the move is recorded, and made to fail as a full GPU does.
    from runtime.engines import EngineError

    _save_tier(tmp_path / "tier", _net())
    moved = []

    def to(self, *args, **kwargs):
        moved.append(str(kwargs.get("device")))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(nn.Module, "to", to)
    options = BuildOptions(max_batch=4, extra={"device": "cuda"})
    with pytest.raises(EngineError, match=r"to cuda:1: CUDA out of memory"):
        TorchBackend().load(tmp_path / "tier", options)
    assert moved == ["cuda:1"]


@pytest.mark.gpu
def test_cuda_graphs_on_a_device_that_is_not_the_current_one(tmp_path, monkeypatch):
    """An engine on "cuda:1" run from threads whose current device is 0 (the server's): its
    graphs must hold the module's kernels, so replays answer each batch, not a stale one."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    torch.cuda.set_device(0)
    net = _net()
    _save_tier(tmp_path / "tier", net)
    options = BuildOptions(max_batch=4, extra={"device": "cuda:1"})
    engine = TorchBackend().load(tmp_path / "tier", options)
    for batch, seed in ((2, 0), (2, 1), (2, 2), (3, 3), (3, 4)):  # each size: capture, replays
        x = _x(batch, seed)
        got = engine.run({"input": x})["logits"]
        np.testing.assert_allclose(got, _expected(net, x), rtol=1e-4, atol=1e-5)
    assert engine.graph_captures == 2 and torch.cuda.current_device() == 0


def test_an_fp32_engine_on_cuda_turns_cudnn_tf32_off(monkeypatch):
    # cuDNN's default let fp32 convolutions run in TF32 (~1e-3 relative) on Ampere and newer,
    # the reference backend less precise than TensorRT's fp32, which clears TF32 (review
    # helper-231). Checked on the switch itself: no GPU here.
    from runtime.engines.torch import _no_tf32

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    _no_tf32(torch.float16)  # fp16's math is not TF32's to change
    assert torch.backends.cudnn.allow_tf32 is True
    _no_tf32(torch.float32)
    assert torch.backends.cudnn.allow_tf32 is False

"""Helpers for server tests: a model repository written without torch, and a server in a
thread.

The repository's tiers are real ONNX graphs written with ``onnx.helper`` (random weights,
no training) and served by the real ONNX Runtime; only the torch build is skipped, which
tests/test_build.py covers on its own. Each tier's engine is built through the engine cache
and profiled with ``runtime.repository.profile.measure``, as ``innfer build`` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from runtime.engines import get_backend
from runtime.repository import (
    FRONTIER_DIR,
    FRONTIER_FILE,
    PROFILE_FILE,
    TIER_FILE,
    Candidate,
    EngineCache,
    Frontier,
    Repository,
    TierRecord,
)
from runtime.repository.config import ModelConfig
from runtime.repository.frontier import mark_pareto
from runtime.repository.profile import measure, profile_document
from server.app import Server
from server.config import ServerConfig

OPSET = 17

TIERS = [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}]


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int):
    w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return numpy_helper.from_array(w.astype(np.float32), name)


def _model(nodes, inits, in_shape: list[int], name: str) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_cnn(width: float, seed: int = 0) -> tuple[bytes, dict[str, int], int, int]:
    """Conv(1->16) ReLU Conv(16->32) ReLU GlobalAvgPool Linear(32->10) on 1x8x8, at
    ``width``: (ONNX bytes, channel counts, FLOPs, params)."""
    rng = np.random.default_rng(seed)
    c1, c2 = round(16 * width), round(32 * width)
    inits = [
        _init(rng, "w1", (c1, 1, 3, 3), 9), _init(rng, "b1", (c1,), 9),
        _init(rng, "w2", (c2, c1, 3, 3), 9 * c1), _init(rng, "b2", (c2,), 9 * c1),
        _init(rng, "w3", (10, c2), c2), _init(rng, "b3", (10,), c2),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    flops = 2 * 64 * 9 * (c1 + c1 * c2) + 2 * c2 * 10
    params = sum(int(np.prod(i.dims)) for i in inits)
    return _model(nodes, inits, [1, 8, 8], "tiny"), {"0": c1, "1": c2}, flops, params


def wide_mlp(width: float, seed: int = 1) -> tuple[bytes, dict[str, int], int, int]:
    """Flatten Linear(784->2048) ReLU Linear(2048->2048) ReLU Linear(2048->10) at ``width``
    (about 1 ms per batch on a CPU core at full width)."""
    rng = np.random.default_rng(seed)
    h = round(2048 * width)
    inits = [
        _init(rng, "w1", (h, 784), 784), _init(rng, "b1", (h,), 784),
        _init(rng, "w2", (h, h), h), _init(rng, "b2", (h,), h),
        _init(rng, "w3", (10, h), h), _init(rng, "b3", (10,), h),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1),
    ]
    flops = 2 * (784 * h + h * h + h * 10)
    params = sum(int(np.prod(i.dims)) for i in inits)
    return _model(nodes, inits, [1, 28, 28], "wide"), {"0": h, "1": h}, flops, params


def slow_loop(width: float, trips: int = 4000, dim: int = 1024) -> tuple[bytes, dict, int, int]:
    """A deliberately slow tier: an ONNX Loop of ``trips`` (1, dim) x (dim, dim) MatMuls
    (identity weights, so the values stay put), then Linear(dim->10); about 0.35 s per
    batch on one idle CPU core. Requests on it stay in flight long enough to observe."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "eye"], ["h_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
        ],
    )
    inits = [
        numpy_helper.from_array(np.eye(dim, dtype=np.float32), "eye"),
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.full((10, dim), 1.0 / dim, np.float32), "head"),
    ]
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "input"], ["h"], body=body),
        helper.make_node("Gemm", ["h", "head"], ["logits"], transB=1),
    ]
    flops = 2 * dim * dim * trips + 2 * dim * 10
    return _model(nodes, inits, [dim], "slow"), {}, flops, dim * dim + 10 * dim


BIG_ROW = 64 * 1024  # float32s in one answer row of add_big_model's "big": 256 KiB


def big_answers(width: float, row: int = BIG_ROW) -> tuple[bytes, dict, int, int]:
    """(B, 64) -> Tile -> (B, ``row``): an answer 1,000 times its request at the default
    (256 KiB a row), the same at every width - for what a server holds of its answers."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["input", "repeats"], ["out"])],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", row])],
        [numpy_helper.from_array(np.array([1, row // 64], np.int64), "repeats")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString(), {}, row, 0


def add_big_model(root: Path) -> Path:
    """Model "big" in ``root``: ``big_answers`` (input [64] -> out [BIG_ROW]), one tier,
    max_batch 1, a 60 s default budget."""
    return add_onnx_model(root, "big", big_answers, {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [64]}],
        "outputs": [{"name": "out", "dtype": "float32", "shape": [BIG_ROW]}],
        "tiers": [{"name": "w100", "width": 1.0}], "max_batch": 1,
        "default_latency_budget_ms": 60_000,
    })  # fmt: skip


def add_onnx_model(
    root: Path, name: str, make, config: dict, warmup: int = 3, repeats: int = 5
) -> Path:
    """Write ``<root>/<name>``: model.yaml, each tier's ONNX and tier.json, then build the
    engines (ONNX Runtime, through the engine cache) and write profile.json."""
    d = root / name
    cfg = ModelConfig.from_dict({"name": name, **config}, source=str(d / "model.yaml"))
    d.mkdir(parents=True)
    (d / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for tier in cfg.tiers:
        data, sizes, flops, params = make(tier.width)
        t = d / "tiers" / tier.name
        t.mkdir(parents=True)
        (t / "model.onnx").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        TierRecord(name=tier.name, width=tier.width, sizes=sizes, onnx_sha256=digest,
                   source_sha256=f"onnx.helper:{digest}", flops=flops, params=params,
                   accuracy=None).write(t / TIER_FILE)  # fmt: skip
    served = Repository(root).load(name)
    backend = get_backend(served.backend)
    tiers = {
        t: measure(e, cfg.inputs, cfg.batch_sizes, warmup=warmup, repeats=repeats)
        for t, e in served.engines.items()
    }
    profile = profile_document(backend, cfg.threads, tiers)
    (d / PROFILE_FILE).write_text(json.dumps(profile, indent=1))
    return d


def build_repository(root: Path) -> Path:
    """Two models: 'tiny' (a small CNN, fast) and 'wide' (784-2048-2048-10, ~1 ms, queue 2),
    each with tiers w100 and w050, max_batch 4, no accuracy measured (FLOPs rank the tiers).
    """
    io = {
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": TIERS,
        "max_batch": 4,
        "default_latency_budget_ms": 200,
    }
    add_onnx_model(root, "tiny", tiny_cnn, {
        **io, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    })  # fmt: skip
    add_onnx_model(root, "wide", wide_mlp, {
        **io, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 28, 28]}],
        "max_queue": 2, "default_latency_budget_ms": 1000,
    })  # fmt: skip
    return root


class ServerThread:
    """Run ``server.app.Server`` on its own event loop in a daemon thread."""

    def __init__(self, config: dict | ServerConfig) -> None:
        if not isinstance(config, ServerConfig):
            config = ServerConfig.from_dict({"grpc_port": 0, "metrics_port": 0, **config})
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.config)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced to the test thread in start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self.thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def add_frontier(model_dir: Path, make, widths: dict[str, tuple[float, float]]) -> Frontier:
    """Write ``frontier/`` for the ONNX model ``make`` at each width: ``widths`` maps a
    candidate name to (width, accuracy); latency measured as ``innfer build`` does. The
    torch-free stand-in for runtime.build.frontier (tests/test_frontier.py builds a real one
    from an INN)."""
    cfg = ModelConfig.load(model_dir / "model.yaml")
    backend = get_backend("onnxruntime")
    candidates = []
    for name, (width, accuracy) in widths.items():
        data, sizes, flops, params = make(width)
        d = model_dir / FRONTIER_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(data)
        options = Repository(model_dir.parent).build_options(cfg, backend)
        engine, _ = EngineCache(model_dir / "engines").get(backend, d / "model.onnx", options)
        latency = measure(engine, cfg.inputs, cfg.batch_sizes, warmup=2, repeats=5)
        engine.close()
        candidates.append(Candidate(
            name=name, sizes=sizes, width=width, flops=flops, params=params, accuracy=accuracy,
            latency=latency, onnx_sha256=hashlib.sha256(data).hexdigest(),
        ))  # fmt: skip
    frontier = Frontier(
        candidates=mark_pareto(candidates, (1, cfg.max_batch)), accuracy_source="test",
        source_sha256="test-frontier", backend=backend.name, device=backend.device(),
        threads=cfg.threads, max_batch=cfg.max_batch,
    )  # fmt: skip
    frontier.write(model_dir / FRONTIER_DIR / FRONTIER_FILE)
    return frontier


def hold_engines(runtime) -> threading.Event:
    """Hold every (fake) engine of ``runtime`` - a hung engine call - until the event is set."""
    gate = threading.Event()
    for e in runtime.served.engines.values():
        e.gate = gate
    return gate


async def until_engine_runs(runtime) -> None:
    """Return once one of ``runtime``'s (fake) engines is inside a call."""
    while sum(e.running for e in runtime.served.engines.values()) == 0:
        await asyncio.sleep(0.002)


def bound_like(real, *args, **kwargs) -> dict:
    """The arguments a fake received, bound to the signature of the ``real`` function it
    stands in for (defaults filled in): a TypeError where the caller calls it wrongly, so
    a fake cannot accept a call the real function would refuse."""
    import inspect

    bound = inspect.signature(real).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def fake_run_load(monkeypatch, tier: str = "w100", codes: list[str] | None = None) -> list:
    """Replace ``sim.loadgen.run_load`` with a fake that answers every request sent from
    ``tier`` 1 ms after it (or gives request i the code ``codes[i]``; "unsent" past the
    run's time bound), for tests that script what no real server does on demand. Each
    call's arguments, bound to the real signature (``bound_like``), are appended to the
    list returned."""
    import sim.loadgen

    real, calls = sim.loadgen.run_load, []

    async def run_load(*args, **kwargs):
        a = bound_like(real, *args, **kwargs)
        calls.append(a)
        n = len(a["arrivals"])
        got = codes or ["OK" if at <= a["max_seconds"] else "unsent" for at in a["arrivals"]]
        latency = np.array([1.0 if c == "OK" else np.nan for c in got])
        s = sim.loadgen._summary(latency, a["budgets_s"], [tier] * n, got, 1.0, a["accuracy"])
        return sim.loadgen.LoadReport(s, latency, [tier] * n, got)

    monkeypatch.setattr(sim.loadgen, "run_load", run_load)
    return calls

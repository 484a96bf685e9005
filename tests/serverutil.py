"""Helpers for server tests: a model repository built once, and a server in a thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import torch
from torch import nn

import runtime
from runtime.build.pipeline import add_model, build_model
from runtime.repository import Repository
from server.app import Server
from server.config import ServerConfig


def build_repository(root: Path) -> Path:
    """Two models: 'tiny' (a small CNN, fast) and 'wide' (784-2048-2048-10, ~1 ms, queue 2)."""
    torch.manual_seed(0)
    tiny = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    wide = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
        nn.Linear(2048, 10),
    ).eval()  # fmt: skip
    io = {
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
        "tiers": [{"name": "w100", "width": 1.0}, {"name": "w050", "width": 0.5}],
        "max_batch": 4,
        "default_latency_budget_ms": 200,
    }
    add_model(root, "tiny", runtime.convert(tiny, (torch.randn(1, 1, 8, 8),)), {
        **io, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 8, 8]}],
    })  # fmt: skip
    add_model(root, "wide", runtime.convert(wide, (torch.randn(1, 1, 28, 28),)), {
        **io, "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 28, 28]}],
        "max_queue": 2, "default_latency_budget_ms": 1000,
    })  # fmt: skip
    repo = Repository(root)
    for name in ("tiny", "wide"):
        build_model(repo, name, progress=False, repeats=5)
    return root


class ServerThread:
    """Run ``server.app.Server`` on its own event loop in a daemon thread."""

    def __init__(self, config: dict) -> None:
        self.config = ServerConfig.from_dict({"grpc_port": 0, "metrics_port": 0, **config})
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

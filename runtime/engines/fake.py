"""Fake backend: stands in for compute in server, scheduler and docs tests. Torch-free.

A fake engine does no inference: ``run`` sleeps for its tier's profiled latency (p50, ms)
at the batch size it runs, then returns deterministic outputs - row ``i`` of every output
depends on input row ``i`` and on the engine's ``scale`` only (``compute``), so a test can
check that each request got its own rows back and from which tier. It records what it ran
(``calls``), and tests can hold it (``gate``) or make it fail (``fail``).

It is not in ``runtime.engines.BACKENDS`` (model.yaml and the server config never offer it);
``get_backend("fake")`` returns it, so a repository loads onto fake engines with
``Repository.load(name, backend="fake")``, and a data plane or server with
``dataclasses.replace(server_config, backend="fake")`` (set past the config's validation).
``write_model`` writes a repository model for it without torch or ONNX: placeholder
``model.onnx`` files, ``tier.json`` records and a ``profile.json`` with the given latencies.
The backend builds an engine from ``<model>/model.yaml``, ``tiers/<tier>/tier.json`` and
``<model>/profile.json``; like every engine it is cached under the ONNX file's hash, so the
latencies are those of the profile when the engine was first built.

Example:
    >>> import numpy as np
    >>> from runtime.engines import TensorSpec
    >>> e = FakeEngine([TensorSpec("x", "float32", (-1, 2))], [TensorSpec("y", "float32",
    ...                (-1, 3))], latency_ms={1: 0.0, 4: 0.0}, scale=0.5)
    >>> out = e.run({"x": np.ones((2, 2), np.float32)})["y"]
    >>> out.shape, float(out[0, 0]), e.calls
    ((2, 3), 1.0, [2])
    >>> path = write_model("models", "tiny", {"w100": 1.0, "w050": 0.5})  # doctest: +SKIP
    >>> Repository("models").load("tiny", backend="fake")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import Backend, BuildOptions, Engine, EngineError, TensorSpec

ENGINE_FILE = "fake.json"
GATE_TIMEOUT_S = 30.0  # a held engine gives up waiting after this long (no hung test runs)


class FakeEngine(Engine):
    """Sleeps its latency, returns ``compute(feeds)``. Thread-safe.

    ``latency_ms``: milliseconds per batch size; a batch between sizes takes the next larger
    size's time, one beyond the largest scales that linearly. ``scale`` tells tiers apart
    in the outputs. ``time_scale`` multiplies every sleep (0: no sleeping at all).
    ``gate``: when set to a ``threading.Event``, ``run`` waits for it before computing.
    ``fail``: when set to an exception, ``run`` raises it (after counting the call).
    """

    backend = "fake"

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        latency_ms: Mapping[int, float] | None = None,
        scale: float = 1.0,
        time_scale: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        name: str = "",
    ) -> None:
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.latency_ms = {int(b): float(v) for b, v in (latency_ms or {1: 0.0}).items()}
        self.scale = float(scale)
        self.time_scale = time_scale
        self.sleep = sleep
        self.name = name
        self.gate: threading.Event | None = None
        self.fail: BaseException | None = None
        self.calls: list[int] = []  # batch rows of every run, in order
        self.running = 0  # runs in progress now
        self.max_running = 0  # the most that ever ran at once
        self._lock = threading.Lock()
        self.closed = False  # set by close(): a test can check that unload released it

    def close(self) -> None:
        self.closed = True

    def seconds(self, batch: int) -> float:
        """How long ``run`` sleeps for ``batch`` rows."""
        sizes = sorted(self.latency_ms)
        fit = next((b for b in sizes if b >= batch), None)
        ms = (
            self.latency_ms[fit]
            if fit is not None
            else self.latency_ms[sizes[-1]] * batch / sizes[-1]
        )
        return ms * self.time_scale / 1e3

    def compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs ``run`` returns, without waiting: output row i, element j is
        ``scale * (sum of input row i over every input) + j``, in the output's dtype."""
        batch = self._check(feeds)
        rows = np.zeros(batch, np.float64)
        for spec in self.inputs:
            rows += feeds[spec.name].reshape(batch, -1).astype(np.float64).sum(axis=1)
        out = {}
        for spec in self.outputs:
            shape = tuple(1 if d < 0 else d for d in spec.shape[1:])
            ramp = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
            value = self.scale * rows.reshape(batch, *([1] * len(shape))) + ramp
            out[spec.name] = (value > 0) if spec.dtype == "bool" else value.astype(spec.dtype)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self._check(feeds)
        with self._lock:
            self.calls.append(batch)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.fail is not None:
                raise self.fail
            gate = self.gate
            if gate is not None and not gate.wait(GATE_TIMEOUT_S):
                raise EngineError(f"fake engine {self.name}: gate not opened in {GATE_TIMEOUT_S} s")
            delay = self.seconds(batch)
            if delay > 0:
                self.sleep(delay)
            return self.compute(feeds)
        finally:
            with self._lock:
                self.running -= 1

    def _check(self, feeds: dict[str, np.ndarray]) -> int:
        names = [s.name for s in self.inputs]
        if sorted(feeds) != sorted(names):
            raise ValueError(
                f"fake engine {self.name}: got inputs {sorted(feeds)}, expected {names}"
            )
        batches = {feeds[n].shape[0] if feeds[n].ndim else -1 for n in names}
        if len(batches) != 1 or -1 in batches:
            raise ValueError(f"fake engine {self.name}: inputs disagree on the batch: {batches}")
        for spec in self.inputs:
            want = tuple(spec.shape[1:])
            got = feeds[spec.name].shape[1:]
            if len(got) != len(want) or any(
                w >= 0 and w != g for w, g in zip(want, got, strict=True)
            ):
                raise ValueError(f"fake engine {self.name}: input {spec.name!r} has shape "
                                 f"{feeds[spec.name].shape}, expected {spec.shape}")  # fmt: skip
        return batches.pop()


class FakeBackend(Backend):
    """Builds fake engines from a repository model's files (see the module docstring)."""

    name = "fake"
    shape_profiled = False

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return "1"

    def device(self) -> str:
        return "fake"

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        import yaml

        tier_dir = onnx_path.parent
        model_dir = tier_dir.parent.parent
        try:
            config = yaml.safe_load((model_dir / "model.yaml").read_text()) or {}
            record = json.loads((tier_dir / "tier.json").read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise EngineError(
                f"fake backend: cannot read {model_dir}'s model files: {exc}"
            ) from exc
        try:
            profile = json.loads((model_dir / "profile.json").read_text())
            table = profile["tiers"][tier_dir.name]
            latency = {str(int(b)): float(v["p50_ms"]) for b, v in table.items()}
        except (OSError, ValueError, KeyError):
            latency = {"1": 0.0}  # not profiled yet: run at once
        width = record.get("width")
        spec = {
            "tier": tier_dir.name,
            "inputs": [_spec_json(t) for t in config.get("inputs", [])],
            "outputs": [_spec_json(t) for t in config.get("outputs", [])],
            "latency_ms": latency,
            "scale": float(width) if isinstance(width, (int, float)) else 1.0,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ENGINE_FILE).write_text(json.dumps(spec, indent=1))
        return [ENGINE_FILE]

    def load(self, out_dir: Path, options: BuildOptions) -> FakeEngine:
        try:
            spec = json.loads((out_dir / ENGINE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"fake backend: cannot load {out_dir / ENGINE_FILE}: {exc}") from exc
        return FakeEngine(
            [TensorSpec(n, d, tuple(s)) for n, d, s in spec["inputs"]],
            [TensorSpec(n, d, tuple(s)) for n, d, s in spec["outputs"]],
            {int(b): v for b, v in spec["latency_ms"].items()},
            scale=spec["scale"],
            name=spec["tier"],
        )


def _spec_json(t: dict[str, Any]) -> list:
    return [t["name"], t.get("dtype", "float32"), [-1, *t["shape"]]]


def write_model(
    root: str | Path,
    name: str,
    tiers: Mapping[str, float],
    latency_ms: Mapping[str, Mapping[int, float]] | None = None,
    *,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    accuracy: Mapping[str, float] | None = None,
    **config: Any,
) -> Path:
    """Write ``<root>/<name>`` for the fake backend: model.yaml (``config`` adds fields such
    as max_batch, max_queue, default_latency_budget_ms), one placeholder ``model.onnx`` and
    ``tier.json`` per tier, and ``profile.json``. Returns the model directory. The files
    follow the repository layout (runtime.repository); loading them validates them.

    ``tiers``: tier name -> width (a fraction, or a mapping of group sizes, taken as 0.5).
    ``latency_ms``: tier -> {batch: p50 ms} (p90 is 1.1 x p50); default: 1 ms x width at
    every batch size 1, 2, 4, ... up to max_batch.
    ``accuracy``: tier -> measured accuracy (default: none, so the tiers rank by FLOPs, as
    after a build without an evaluation set). Inputs/outputs default to ``input`` [4] ->
    ``logits`` [3].
    """
    import hashlib

    import yaml

    d = Path(root) / name
    data = {
        "inputs": inputs or [{"name": "input", "dtype": "float32", "shape": [4]}],
        "outputs": outputs or [{"name": "logits", "dtype": "float32", "shape": [3]}],
        "tiers": [{"name": t, "width": w} for t, w in tiers.items()],
        **config,
    }
    max_batch = int(config.get("max_batch", 8))
    batches = sorted({*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch),
                      max_batch})  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    profile: dict[str, Any] = {"device": "fake", "backend": "fake", "backend_version": "1",
                               "threads": config.get("threads", 1), "tiers": {}}  # fmt: skip
    for tier, width in tiers.items():
        # A per-group width (a mapping of channel counts) stands in as half the network.
        size = float(width) if isinstance(width, (int, float)) else 0.5
        t = d / "tiers" / tier
        t.mkdir(parents=True, exist_ok=True)
        placeholder = f"innfer fake tier {name}/{tier} width {width}\n".encode()
        (t / "model.onnx").write_bytes(placeholder)
        record = {
            "name": tier,
            "width": width,
            "sizes": {},
            "onnx_sha256": hashlib.sha256(placeholder).hexdigest(),
            "source_sha256": "fake",
            "flops": max(1, round(1e6 * size * size)),
            "params": max(1, round(1e4 * size)),
            "accuracy": (accuracy or {}).get(tier),
        }
        (t / "tier.json").write_text(json.dumps(record, indent=1))
        table = (latency_ms or {}).get(tier) or {b: 1.0 * size for b in batches}
        profile["tiers"][tier] = {
            str(b): {"p50_ms": float(ms), "p90_ms": 1.1 * float(ms), "runs": 1}
            for b, ms in sorted(table.items())
        }
    (d / "profile.json").write_text(json.dumps(profile, indent=1))
    return d

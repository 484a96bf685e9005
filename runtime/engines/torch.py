"""Torch backend: the reference for correctness, and the fallback; CUDA graphs on a GPU.

Its "engine" is the sampled tier itself, stored without pickle as ``module.json`` (the
architecture, see ``runtime.inn.graphio``) plus ``module.safetensors``; module.json names the
tier's model.onnx it was exported with, and ``build`` refuses files of another export
(``module_files_problem``). Needs torch by nature: the serving image without torch simply
reports this backend unavailable.

On CPU a batch runs eagerly, module call by module call. On CUDA a small tier is
launch-bound (eager at batch 8: w100 1.62 ms, w025 1.45 ms), so the engine captures one
``torch.cuda.CUDAGraph`` per input shape, lazily on the first batch of that shape (batch
sizes 1..``max_batch``, and for a sequence model at most ``MAX_LENGTHS`` lengths per size,
so memory stays bounded: the server pads a text batch to its lane's profiled length for
such an engine, ``prefers_fixed_lengths``), and replays it afterwards: inputs are copied into
the graph's static input tensors, the graph is replayed, the static outputs copied out.
``BuildOptions(extra={"cuda_graphs": False})`` or the environment variable
``INNFER_CUDA_GRAPHS=0`` turns graphs off; a capture that fails is logged once and the engine
runs eagerly from then on (graphs already captured keep replaying).

Example:
    >>> backend = TorchBackend()
    >>> opts = BuildOptions(max_batch=8, extra={"device": "cuda"})
    >>> engine = backend.load(Path("engines/k"), opts)  # doctest: +SKIP
    >>> engine.run({"input": x})["logits"].shape  # first batch of 3: captured  # doctest: +SKIP
    (3, 10)
    >>> engine.run({"input": x})["logits"].shape  # again: replayed  # doctest: +SKIP
    (3, 10)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.hashing import sha256_file

from .base import Backend, BuildOptions, Engine, EngineError, TensorSpec, interrupted
from .feeds import check_feeds
from .onnxruntime import cpu_isa

log = logging.getLogger("innfer.engines.torch")

MODULE_SPEC = "module.json"
MODULE_WEIGHTS = "module.safetensors"
# A dynamic axis any size runs at (the engine runs eagerly past its graphs' max_batch).
_ANY = 2**31 - 1
# Operators' switch, outside the cache key: INNFER_CUDA_GRAPHS=0 runs CUDA engines eagerly.
CUDA_GRAPHS_ENV = "INNFER_CUDA_GRAPHS"
# Eager runs before a capture, on a side stream as PyTorch's CUDA graph notes ask: they
# initialise lazily created state (cuBLAS/cuDNN handles, workspaces) that must not be
# created inside a capture. Three is torch.cuda.make_graphed_callables' default.
_WARMUP_ITERS = 3
# Graphs per batch size at most: one per profiled length of a sequence model (ModelConfig's
# doubling lengths 16..max_length make 5-6); a model with fixed shapes has one.
MAX_LENGTHS = 8


@dataclass
class _Graph:
    """One captured batch size: the graph and the tensors it reads and writes in place."""

    graph: Any  # torch.cuda.CUDAGraph
    shapes: tuple[tuple[int, ...], ...]  # the input shapes it was captured for
    inputs: list[Any]  # static input tensors (device)
    outputs: tuple[Any, ...]  # static output tensors (device), rewritten by every replay


class _CaptureGate:
    """Shared by CUDA runs, held alone by a capture. Measured on an H200 with torch 2.11:
    while one thread captures, another thread's host-to-device copy raises ("Cannot copy
    between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned")
    and the capture itself fails (cudaErrorIllegalState) - the process's CUDA work must
    stop for a capture, whatever the capture mode. Captures are rare (once per engine and
    batch size), so they wait for running batches, and new runs wait behind a waiting
    capture (else a busy server would starve it).

    Example:
        >>> gate = _CaptureGate()
        >>> with gate.shared():
        ...     pass  # a CUDA run; others may run beside it, no capture can start
        >>> with gate.exclusive():
        ...     pass  # a capture: nothing else runs on CUDA meanwhile
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._capturing = False
        self._waiting = 0  # captures waiting for the running batches to finish

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._capturing and not self._running)
            self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


# One per process: CUDA graph capture stops every engine's CUDA work, not only its own.
_GATE = _CaptureGate()


def spec_digest(meta: dict) -> str:
    """sha256 of a module.json's architecture, inputs and outputs (what ``spec_sha256``
    records), in a canonical JSON form.

    Example:
        >>> spec_digest({"architecture": {}, "inputs": [], "outputs": []})[:12]
        '8ea95cc3a85d'
    """
    body = {k: meta.get(k) for k in ("architecture", "inputs", "outputs")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def module_files_problem(d: Path, onnx_sha256: str, shown: Path | None = None) -> str | None:
    """Why ``d``'s module.json and module.safetensors are not the tier whose model.onnx has
    sha256 ``onnx_sha256``, or None when they are; ``shown``: the directory the message
    names instead of ``d`` (the tier a copy in ``d`` was made of). ``innfer build`` writes
    them before the ONNX, module.json recording the sha256 of both that ONNX and the
    weights file: a server that loads the tier between those writes (or after an
    interrupted build) must not build one export's weights into the engine cache under
    another export's key.

    Example:
        >>> module_files_problem(Path("no-such-tier"), "0" * 64)
        'no-such-tier/module.json is missing'
    """
    shown = d if shown is None else shown
    spec, weights = shown / MODULE_SPEC, shown / MODULE_WEIGHTS
    try:
        meta = json.loads((d / MODULE_SPEC).read_text())
    except FileNotFoundError:
        return f"{spec} is missing"
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        return f"{spec} is unreadable: {exc}"
    if not isinstance(meta, dict):
        return f"{spec} is not a JSON object"
    recorded = meta.get("onnx_sha256")
    if recorded is None:
        return f"{spec} does not say which model.onnx it belongs to (written by an older innfer)"
    if recorded != onnx_sha256:
        return f"{spec} belongs to another export of the tier than its model.onnx"
    # Its layers: a module.json edited or damaged after the build (a layer's padding mode)
    # loaded and answered unlike its model.onnx, in silence (review helper-146). Written
    # by innfer since; an older file has no digest to check.
    if "spec_sha256" in meta and meta["spec_sha256"] != spec_digest(meta):
        return f"{spec} was changed after the build: its layers are not those it was written with"
    if not (d / MODULE_WEIGHTS).is_file():
        return f"{weights} is missing"
    if sha256_file(d / MODULE_WEIGHTS) != meta.get("weights_sha256"):
        return f"{weights} is not the weights file {spec} was written with"
    return None


def cuda_graphs_enabled(options: BuildOptions) -> bool:
    """Whether CUDA engines should capture graphs: the option, then the environment.

    Example:
        >>> cuda_graphs_enabled(BuildOptions(extra={"cuda_graphs": False}))
        False
    """
    if not options.extra.get("cuda_graphs", True):
        return False
    return os.environ.get(CUDA_GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _torch_dtype(name: str):
    """The torch dtype of a TensorSpec's numpy dtype name ("float32", "int64", "bool", ...).

    Example:
        >>> _torch_dtype("int64")
        torch.int64
    """
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineError(f"output dtype {name!r} has no torch equivalent")
    return dtype


def _no_tf32(dtype) -> None:
    """fp32 means fp32 on a GPU, as the TensorRT backend's clearing of BuilderFlag.TF32
    says: cuDNN's default (``torch.backends.cudnn.allow_tf32`` True) let an fp32 engine's
    convolutions run in TF32 on Ampere and newer, ~1e-3 relative - the backend that is the
    reference for correctness less precise than TensorRT's fp32 (review helper-231). Set for
    the process, once an fp32 engine loads on CUDA: the flag is global, and a per-run switch
    would race between engines' threads (an fp16 engine's math is not TF32's to change)."""
    import torch

    if dtype is torch.float32 and torch.backends.cudnn.allow_tf32:
        torch.backends.cudnn.allow_tf32 = False
        log.info("cuDNN's TF32 off for this process: fp32 torch engines compute in fp32")


def _set_cpu_threads(threads: int) -> None:
    """Set torch's intra-op threads to ``threads`` (``BuildOptions.threads``) in the loading
    thread, as ONNX Runtime's session option does for its engines: the timing at load runs
    here. With OpenMP the setting is per thread (a thread's first torch call takes the
    global default), so each engine also sets its own count in the thread that runs it
    (``TorchEngine.run``) - profile.json's threads are the ones the engine ran with. A
    change is logged (once per change) since it overrides whatever was set before."""
    import torch

    current = torch.get_num_threads()
    if current != threads:
        log.info(
            "torch intra-op threads %d -> %d for a CPU torch engine (process-wide: every "
            "torch engine and torch computation in this process uses them)",
            current,
            threads,
        )
        torch.set_num_threads(threads)


def _writable(array: np.ndarray) -> np.ndarray:
    """``array`` contiguous and writable: a request's arrays are read-only views of its
    message, and torch warns on (and would allow writes to) tensors over them. The engine
    never writes its inputs; the copy is made only when the view is read-only."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


class TorchEngine(Engine):
    """A sampled tier run by torch; on CUDA, one CUDA graph per input shape (module doc).

    ``graph_captures`` counts captures (a replay does not add one); ``captured_batches``
    lists the batch sizes that have a graph.

    Example:
        >>> engine = TorchBackend().load(Path("engines/k"), BuildOptions())  # doctest: +SKIP
        >>> x = np.zeros((2, 1, 8, 8), np.float32)
        >>> engine.run({"input": x})["logits"].shape  # doctest: +SKIP
        (2, 10)
    """

    backend = "torch"
    concurrent_runs = 1  # one module behind a lock (eager CUDA forward is not re-entrant)

    def __init__(
        self,
        module,
        device: str,
        dtype,
        inputs,
        outputs,
        *,
        max_batch: int = 8,
        cuda_graphs: bool = True,
        threads: int | None = None,
    ) -> None:
        self.module, self.device, self.dtype = module, device, dtype
        self.inputs, self.outputs = inputs, outputs
        self.max_batch = max_batch
        # On CPU: torch's intra-op threads for this engine's runs, set in the thread that
        # runs it (with OpenMP the setting is per thread: a load on one executor thread did
        # not reach the engine thread, which ran with another count; review helper-139).
        self.threads = threads
        # Inputs are checked as ONNX Runtime checks them (dtype, rank, fixed dims); any
        # batch and length runs (eagerly past the graphs' max_batch).
        self._bounds = {s.name: tuple(_ANY if d < 0 else d for d in s.shape) for s in inputs}
        self._lock = threading.Lock()  # one module; eager forward is not re-entrant on CUDA
        # Only a CUDA device can capture; on CPU nothing below is ever touched.
        self._on_cuda = str(device).split(":", 1)[0] == "cuda"
        self._use_graphs = cuda_graphs and self._on_cuda
        # One graph per input shapes: per batch size, and for a sequence model per length
        # too (the server pads to a few lengths for it: prefers_fixed_lengths).
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None  # one memory pool shared by this engine's graphs
        # Warm-up and capture stream, made on this engine's device at its first capture
        # (torch.cuda.graph's default is one process-wide stream, made on whichever device
        # was current when it was first used).
        self._stream = None
        self._capture_failed = False
        self.graph_captures = 0

    @property
    def prefers_fixed_lengths(self) -> bool:
        # Padding pays only while graphs are captured and replayed.
        return self._use_graphs and not self._capture_failed

    @property
    def slow_first_shapes(self) -> bool:
        # A new shape is captured (3 warm-up forwards and the capture) while graphs work.
        return self._use_graphs and not self._capture_failed

    @property
    def captured_batches(self) -> list[int]:
        return sorted({shapes[0][0] for shapes in self._graphs})

    @property
    def captured_shapes(self) -> list[tuple]:
        return sorted(self._graphs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.module is None:
            raise EngineError("the engine was closed (its model was unloaded or replaced)")
        arrays = check_feeds(self.inputs, feeds, self._bounds)
        args = [torch.from_numpy(_writable(a)) for a in arrays]
        with self._lock, torch.inference_mode():
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            entry = self._graph_for(args) if self._use_graphs else None
            with _GATE.shared() if self._on_cuda else contextlib.nullcontext():
                if entry is not None:
                    outs = self._replay(entry, args)
                else:
                    args = [a.to(self.device, self._dtype_for(a)) for a in args]
                    out = self.module(*args)
                    outs = out if isinstance(out, (tuple, list)) else (out,)
                # Each output as its spec declares it: fp16 compute back to the declared
                # float32, integer and bool outputs (labels, masks) kept as they are.
                # .cpu() copies: the arrays never alias a graph's static outputs.
                arrays = [
                    o.to(_torch_dtype(s.dtype)).cpu().numpy()
                    for s, o in zip(self.outputs, outs, strict=True)
                ]
        return {s.name: a for s, a in zip(self.outputs, arrays, strict=True)}

    def close(self) -> None:
        """Release the module, the captured graphs and their memory pool; a run after it
        raises EngineError, as ONNX Runtime's engine does (it ran on, holding the weights -
        GPU memory on CUDA - for whoever kept the engine)."""
        with self._lock:
            self.module = None
            self._graphs.clear()
            self._pool = None
            self._stream = None

    def _dtype_for(self, tensor):
        return self.dtype if tensor.is_floating_point() else tensor.dtype

    def _graph_for(self, args) -> _Graph | None:
        """This batch's graph, captured first if it is new; None: run eagerly instead."""
        shapes = tuple(tuple(a.shape) for a in args)
        if not shapes or not all(shapes) or len({s[0] for s in shapes}) != 1:
            return None  # scalars or inputs disagreeing on the batch: eager reports it
        batch = shapes[0][0]
        if not 1 <= batch <= self.max_batch:
            return None  # outside the profile: not worth a graph's memory
        entry = self._graphs.get(shapes)
        if entry is None:
            if self._capture_failed:
                return None
            if sum(1 for s in self._graphs if s[0][0] == batch) >= MAX_LENGTHS:
                return None  # (lengths the server did not pad to a profiled one: eager)
            with _GATE.exclusive():
                entry = self._capture(args, shapes)
        return entry

    def _replay(self, entry: _Graph, args) -> tuple:
        import torch

        # The copies and the replay on the current stream of the engine's device, where the
        # graph was captured, whichever device is current in this thread.
        with torch.cuda.device(torch.device(self.device)):
            for static, arg in zip(entry.inputs, args, strict=True):
                static.copy_(arg)  # host -> device (and fp32 -> fp16 where the engine is fp16)
            entry.graph.replay()
        return entry.outputs

    def _capture(self, args, shapes) -> _Graph | None:
        """Warm up on a side stream, then capture one forward; None if capture fails.

        All of it with the engine's device current: "cuda:1" from a thread whose current
        device is 0 would otherwise capture on a stream of device 0 while the module's
        kernels run on device 1 - an empty graph (torch only warns) whose replays return
        stale outputs."""
        import torch

        device = torch.device(self.device)
        with torch.cuda.device(device):
            return self._capture_on(device, args, shapes)

    def _capture_on(self, device, args, shapes) -> _Graph | None:
        import torch

        static = [torch.empty(a.shape, dtype=self._dtype_for(a), device=device) for a in args]
        for s, a in zip(static, args, strict=True):
            s.copy_(a)  # real values: warm-up takes the same paths as serving
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(device))
        # Errors here are the module's own (it would fail eagerly too): let them propagate.
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                self.module(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # _GATE holds every torch engine's CUDA work off meanwhile; thread_local keeps
            # other threads' CUDA calls outside torch engines (another library's) from
            # failing the capture, as the default "global" mode would. Sharing one pool is
            # safe here: replays are serialised by the lock and the outputs are copied out
            # before the next replay of any of these graphs. The capture runs on this engine's
            # own stream, of its device (the warm-up's: nothing else is queued on it).
            with torch.cuda.graph(
                graph, pool=self._pool, stream=side, capture_error_mode="thread_local"
            ):
                out = self.module(*static)
        except Exception as exc:  # anything torch refuses to capture: serve eagerly instead
            self._capture_failed = True
            log.warning(
                "CUDA graph capture failed for batch %d (%s: %s); running this engine "
                "eagerly for uncaptured batch sizes from now on",
                shapes[0][0],
                type(exc).__name__,
                exc,
            )
            return None
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        entry = _Graph(graph, shapes, static, outs)
        self._graphs[shapes] = entry
        self.graph_captures += 1
        log.debug("captured a CUDA graph for batch %d on %s", shapes[0][0], self.device)
        return entry


class TorchBackend(Backend):
    """``BuildOptions.extra['device']``: 'cpu' (default) or 'cuda'; ``extra['cuda_graphs']``:
    False runs CUDA engines eagerly (default True; see also ``INNFER_CUDA_GRAPHS``);
    ``threads``: torch's intra-op threads on CPU, set at load for the whole process.

    Example:
        >>> TorchBackend().name
        'torch'
    """

    name = "torch"
    shape_profiled = False  # build copies the module; CUDA graphs are captured at load

    def available(self) -> bool:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            interrupted(exc)
            return False
        return True

    def unavailable_reason(self) -> str | None:
        if self.available():
            return None
        return "the torch backend needs torch, which this install lacks: pip install torch"

    def version(self) -> str:
        import torch

        return torch.__version__

    def device(self) -> str:
        import torch

        if torch.cuda.is_available():
            # The engines load on "cuda": the current device, which torch.cuda.set_device
            # (or a launcher) may have made another than 0 - the profile is that GPU's.
            return torch.cuda.get_device_name(torch.cuda.current_device())
        # As ONNX Runtime's: a profile timed on an AVX-512 machine is not trusted on an
        # AVX2 or an ARM one (plain "cpu" matched every CPU).
        return f"cpu-{platform.machine()}-{cpu_isa()}"

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        """Copy the tier's module.json and module.safetensors (beside ``onnx_path``) into
        ``out_dir``; EngineError unless the copies are the module exported with that ONNX
        (``module_files_problem``)."""
        src = onnx_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (MODULE_SPEC, MODULE_WEIGHTS):
            if not (src / name).is_file():
                raise EngineError(f"{src / name} is missing; rebuild the tier with innfer build")
            shutil.copyfile(src / name, out_dir / name)
        # The copies are checked, not the sources: ``innfer build`` may be rewriting the tier.
        problem = module_files_problem(out_dir, sha256_file(onnx_path), shown=src)
        if problem is not None:
            raise EngineError(
                f"{problem}; rebuild the tier with innfer build (or, where a build is writing "
                "it now, load it again once that build is done)"
            )
        return [MODULE_SPEC, MODULE_WEIGHTS]

    def load(self, out_dir: Path, options: BuildOptions) -> TorchEngine:
        """Load the module from ``out_dir``. On CPU the engine runs at ``options.threads``
        intra-op threads (set in the loading thread and in each thread that runs it:
        ``_set_cpu_threads``, ``TorchEngine.run``)."""
        import torch
        from safetensors.torch import load_file

        from runtime.inn.graphio import from_spec

        try:
            meta = json.loads((out_dir / MODULE_SPEC).read_text())
            # [name, dtype, shape] per tensor; a file without them is no module to serve
            inputs = [TensorSpec(n, d, tuple(s)) for n, d, s in meta["inputs"]]
            outputs = [TensorSpec(n, d, tuple(s)) for n, d, s in meta["outputs"]]
            module = from_spec(meta["architecture"], load_file(str(out_dir / MODULE_WEIGHTS)))
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
            raise EngineError(f"cannot load the torch module in {out_dir}: {what}") from exc
        device = options.extra.get("device", "cpu")
        on_cpu = str(device).split(":", 1)[0] == "cpu"
        if on_cpu:
            _set_cpu_threads(options.threads)
        elif str(device) == "cuda":
            # The loading thread's current GPU, named: the engine threads' current device is
            # 0, where a bare "cuda" put every batch's inputs beside a module on another
            # GPU (review helper-268).
            device = f"cuda:{torch.cuda.current_device()}"
        dtype = torch.float16 if options.precision == "fp16" else torch.float32
        if not on_cpu:
            _no_tf32(dtype)
        try:
            module = module.to(device=device, dtype=dtype).eval()
        except RuntimeError as exc:  # torch.OutOfMemoryError (a full GPU), a bad device:
            # the cache's EngineError path, not "unexpected error while loading"
            raise EngineError(
                f"cannot move the torch module in {out_dir} to {device}: "
                f"{str(exc).splitlines()[0][:300]}"
            ) from exc
        return TorchEngine(
            module,
            device,
            dtype,
            inputs,
            outputs,
            max_batch=options.max_batch,
            cuda_graphs=cuda_graphs_enabled(options),
            threads=options.threads if on_cpu else None,
        )

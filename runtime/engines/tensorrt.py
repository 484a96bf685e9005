"""TensorRT backend: one serialized engine (``engine.plan``) per tier, run on an NVIDIA GPU.

``build`` parses the tier's ONNX file into a strongly typed network, gives every input whose
batch axis is dynamic one optimisation profile (batch 1 .. ``max_batch``, tuned for
``opt_batch``; a sequence model's length axis 1 .. its longest profiled length, tuned for
the middle one, ``BuildOptions.sequence``), and serialises the engine. Builds share one
timing cache per GPU model and TensorRT version, ``timing-<device>-trt<version>.cache``
beside the engine directories (a cache is only valid for the device and version that made
it), so every build after the first skips most kernel timing; it is merged with what
other builds saved meanwhile and replaced atomically. ``load`` deserialises the plan,
allocates device buffers and pinned (page-locked) host staging buffers once for
``max_batch`` and reuses them for every ``run``: feeds are copied into the pinned
buffers, moved with ``cudaMemcpyAsync`` on the engine's stream, and the stream is
synchronised once per run.

Neither ``tensorrt`` nor ``cuda-python`` is imported until a method needs it, so importing
this module always works; torch is never imported. Device memory, pinned host memory and
the stream come from NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``).

Precision: networks are created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (weak
typing, and with it ``BuilderFlag.FP16``, is deprecated since TensorRT 10.12 and gone in 11,
where every network is strongly typed), so a tensor's precision is the one the ONNX graph
gives it. "fp32" builds the ONNX file as it is (TF32 off unless ``extra["tf32"]``). "fp16"
converts the graph to fp16 first with onnxconverter-common's documented
``float16.convert_float_to_float16(model, keep_io_types=True)`` (``pip install
innfer[gpu]``), or, where that package is not installed, with the built-in pass
``runtime.engines.fp16.convert_to_fp16``; the log says which one ran. Either way the
engine's inputs and outputs keep the ONNX file's (fp32) dtypes.

TensorRT 10 or newer is required (``unavailable_reason`` says so, and build and load
refuse an older one): TensorRT 8.6 gives an optimisation profile only to an engine's
first execution context (model.yaml's ``instances`` makes several), and its ONNX parser
turns int64 inputs (a text tier's token ids and mask) into int32.

Example:
    >>> backend = TensorRTBackend()
    >>> backend.available()  # False without tensorrt, cuda-python and a GPU  # doctest: +SKIP
    True
    >>> opts = BuildOptions(precision="fp16", max_batch=8, opt_batch=4)
    >>> backend.build(Path("tier/model.onnx"), Path("engines/k"), opts)  # doctest: +SKIP
    ['engine.plan']
    >>> with backend.load(Path("engines/k"), opts) as engine:  # doctest: +SKIP
    ...     out = engine.run({"input": x})  # x: float32 (batch<=8, ...)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_bytes
from runtime.flock import exclusive

from .base import (
    Backend,
    BackendUnavailable,
    BuildOptions,
    Engine,
    EngineError,
    TensorSpec,
    interrupted,
)
from .feeds import check_feeds
from .fp16 import FP16_MAX, convert_to_fp16
from .fp16 import PASS_VERSION as FP16_PASS

log = logging.getLogger("innfer.engines.tensorrt")

PLAN_FILE = "engine.plan"
# One timing cache per GPU model, TensorRT version and precision, beside the engine
# directories: NVIDIA's builder-performance guide says a cache is specific to the BuilderConfig
# flags that change layer implementations, such as TF32 - which fp32 builds clear and fp16
# builds leave on (review helper-268). fp32's name has no suffix (the name before).
TIMING_CACHE_PATTERN = "timing-{device}-trt{version}{suffix}.cache"
TIMING_CACHES = "timing-*.cache"  # every TIMING_CACHE_PATTERN name (a glob)
PRECISIONS = ("fp32", "fp16")
# Builder scratch memory; 1 GiB is ample for the small per-tier networks served here.
# Override with BuildOptions(extra={"workspace_mib": N}).
DEFAULT_WORKSPACE_MIB = 1024
# Python logging level for TensorRT's VERBOSE messages: below DEBUG, so hidden by default.
_VERBOSE = 5
# Oldest TensorRT major version served (module doc: why not 8.6).
MIN_TRT_MAJOR = 10


# --- lazy imports ------------------------------------------------------------------------


def _import_trt():
    """The ``tensorrt`` module, or BackendUnavailable."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        interrupted(exc)
        raise BackendUnavailable(
            f"the tensorrt backend needs the tensorrt package ({exc}); "
            "install it on a machine with an NVIDIA GPU: pip install tensorrt"
        ) from exc
    return trt


def _supported_trt():
    """The ``tensorrt`` module if it is TensorRT ``MIN_TRT_MAJOR`` or newer, else
    BackendUnavailable saying which version was found and how to upgrade."""
    trt = _import_trt()
    version = str(getattr(trt, "__version__", "of unknown version"))
    major = re.match(r"\s*(\d+)", version)
    if major is None or int(major.group(1)) < MIN_TRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} found; innfer needs TensorRT {MIN_TRT_MAJOR} or newer "
            "(older ones give only an engine's first execution context an optimisation "
            "profile, and their ONNX parser turns int64 inputs into int32): "
            f"pip install 'tensorrt>={MIN_TRT_MAJOR}'"
        )
    return trt


def _import_cudart():
    """cuda-python's runtime API module, or BackendUnavailable.

    ``cuda.bindings.runtime`` is the home since cuda-python 12.6; ``cuda.cudart`` is the
    older, since-removed location.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as first:
        interrupted(first)
        try:
            from cuda import cudart
        except ImportError as exc:
            interrupted(exc)
            raise BackendUnavailable(
                f"the tensorrt backend needs NVIDIA's cuda-python package ({exc}): "
                "pip install cuda-python"
            ) from exc
    return cudart


_logger_lock = threading.Lock()
_logger: Any = None


def _trt_logger(trt):
    """One process-wide TensorRT logger that forwards to python logging.

    TensorRT treats the logger as a singleton (every Builder and Runtime must share one),
    and it must outlive every object created through it, hence the module global.
    """
    global _logger
    with _logger_lock:
        if _logger is None:
            levels = {
                int(trt.ILogger.Severity.INTERNAL_ERROR): logging.CRITICAL,
                int(trt.ILogger.Severity.ERROR): logging.ERROR,
                int(trt.ILogger.Severity.WARNING): logging.WARNING,
                int(trt.ILogger.Severity.INFO): logging.DEBUG,  # chatty: build details
                int(trt.ILogger.Severity.VERBOSE): _VERBOSE,
            }

            class _LoggingBridge(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)  # required by the pybind11 base class

                def log(self, severity, msg) -> None:
                    level = levels.get(int(severity), logging.WARNING)
                    if log.isEnabledFor(level):
                        log.log(level, "TensorRT: %s", msg)

            _logger = _LoggingBridge()
        return _logger


# --- CUDA (cuda-python) ------------------------------------------------------------------


def _device_properties(cuda: _Cuda):
    """cudaDeviceProp of the current device (its name, compute capability, SM count)."""
    index = cuda.call("cudaGetDevice", cuda.rt.cudaGetDevice())
    return cuda.call("cudaGetDeviceProperties", cuda.rt.cudaGetDeviceProperties(index))


class _Cuda:
    """Checked calls into cuda-python's runtime API.

    Every cuda-python call returns ``(error, *values)``; ``call`` raises EngineError with
    the CUDA error name unless the error is cudaSuccess, and returns the values.
    """

    def __init__(self, cudart) -> None:
        self.rt = cudart

    def call(self, what: str, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA {what} failed: {_cuda_error_name(self.rt, err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def malloc(self, nbytes: int) -> int:
        # cudaMalloc(0) may return a null pointer; TensorRT rejects null tensor addresses.
        return int(self.call(f"cudaMalloc({nbytes} bytes)", self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", self.rt.cudaFree(ptr))

    def stream_create(self):
        """A non-blocking stream: a blocking one waits for (and holds up) all work on the
        legacy default stream, which torch's eager CUDA work in this process uses."""
        flags = getattr(self.rt, "cudaStreamNonBlocking", 1)  # cudaStreamNonBlocking = 0x01
        return self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(flags))

    def stream_destroy(self, stream) -> None:
        self.call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def synchronize(self, stream) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory: copies from it are truly asynchronous (no staging copy
        inside the driver). Free with ``free_host``."""
        flags = getattr(self.rt, "cudaHostAllocDefault", 0)
        res = self.rt.cudaHostAlloc(max(nbytes, 1), flags)
        return int(self.call(f"cudaHostAlloc({nbytes} bytes)", res))

    def free_host(self, ptr: int) -> None:
        self.call("cudaFreeHost", self.rt.cudaFreeHost(ptr))

    def to_device(self, dst: int, src: int, nbytes: int, stream) -> None:
        """Queue a copy of ``nbytes`` from host address ``src`` to device address ``dst``."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        res = self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream)
        self.call("cudaMemcpyAsync (host to device)", res)

    def to_host(self, dst: int, src: int, nbytes: int, stream) -> None:
        """Queue a copy of ``nbytes`` from device address ``src`` to host address ``dst``."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        res = self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream)
        self.call("cudaMemcpyAsync (device to host)", res)


def _host_array(ptr: int, nbytes: int, dtype: str) -> np.ndarray:
    """A flat numpy view of ``nbytes`` of host memory at ``ptr`` (no copy, no ownership)."""
    raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
    return np.ctypeslib.as_array(raw).view(np.dtype(dtype))


def _cuda_error_name(cudart, err) -> str:
    name = getattr(err, "name", None) or str(err)
    try:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the name alone is still useful
        return name
    return f"{name} ({text})"


# --- options ------------------------------------------------------------------------------


def _check_options(options: BuildOptions) -> None:
    """Reject bad options before TensorRT is even imported (ValueError: caller's mistake)."""
    if options.precision not in PRECISIONS:
        raise ValueError(
            f"the tensorrt backend builds {' or '.join(PRECISIONS)} engines, "
            f"got precision {options.precision!r}"
        )
    if options.max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {options.max_batch}")
    if not 1 <= options.opt_batch <= options.max_batch:
        raise ValueError(
            f"opt_batch must be between 1 and max_batch={options.max_batch}, "
            f"got {options.opt_batch}"
        )
    seq = options.sequence
    if seq is not None and not (
        len(seq) == 3 and all(isinstance(n, int) for n in seq) and 1 <= seq[0] <= seq[1] <= seq[2]
    ):
        raise ValueError(
            f"sequence must be (shortest, tuned-for, longest) lengths with "
            f"1 <= shortest <= tuned-for <= longest, got {seq!r}"
        )
    workspace = options.extra.get("workspace_mib", DEFAULT_WORKSPACE_MIB)
    if not isinstance(workspace, int) or workspace < 1:
        raise ValueError(f"extra['workspace_mib'] must be a positive int, got {workspace!r}")


def timing_cache_name(device: str, version: str, precision: str = "fp32") -> str:
    """The timing cache's file name for a GPU model, TensorRT version and precision.

    Device and version are reduced to ``[a-z0-9.]`` runs joined by '-', so the name is a
    safe file name whatever the driver reports.

    Example:
        >>> timing_cache_name("NVIDIA H100 80GB HBM3", "10.13.0.35")
        'timing-nvidia-h100-80gb-hbm3-trt10.13.0.35.cache'
        >>> timing_cache_name("NVIDIA H100 80GB HBM3", "10.13.0.35", "fp16")
        'timing-nvidia-h100-80gb-hbm3-trt10.13.0.35-fp16.cache'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    suffix = "" if precision == "fp32" else f"-{precision}"
    return TIMING_CACHE_PATTERN.format(device=_slug(device), version=_slug(version), suffix=suffix)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.") or "unknown"


# --- backend ------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """Builds and loads TensorRT engines on the current CUDA device.

    ``BuildOptions.extra``: ``workspace_mib`` caps the builder's scratch memory (default
    1024); ``tf32=True`` lets fp32 engines use TF32 matmuls (off: fp32 means fp32).

    Example:
        >>> backend = TensorRTBackend()
        >>> backend.name
        'tensorrt'
        >>> backend.device()  # doctest: +SKIP
        'NVIDIA H100 80GB HBM3'
    """

    name = "tensorrt"

    def available(self) -> bool:
        """True only if tensorrt and cuda-python import and a CUDA device is present."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Which of tensorrt (10 or newer), cuda-python and a CUDA device is missing, or None."""
        try:
            _supported_trt()
            cudart = _import_cudart()
            err, count = cudart.cudaGetDeviceCount()
        except BackendUnavailable as exc:  # says which package, and how to install it
            return str(exc)
        except Exception as exc:  # a broken install, a driver that does not load
            return f"the tensorrt backend cannot reach CUDA: {type(exc).__name__}: {exc}"
        if err != cudart.cudaError_t.cudaSuccess:
            return f"no CUDA device: cudaGetDeviceCount returned {err} (is the driver loaded?)"
        if count < 1:
            return "no CUDA device on this machine"
        return None

    def version(self) -> str:
        return _import_trt().__version__

    def device(self) -> str:
        name = _device_properties(_Cuda(_import_cudart())).name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip()

    def key_fields(self, options: BuildOptions) -> dict[str, Any]:
        """What a plan depends on beyond the device's name and TensorRT's version: the
        device's compute capability and SM count (a MIG slice bears its GPU's name with
        fewer SMs, and TensorRT tunes its tactics to them) and the version of the CUDA
        runtime this process loads (cuda-python's libcudart: an environment of TensorRT's
        cu13 build loads 13.x where the cu12 build's loads 12.x, and the two share one
        TensorRT version string; a cuda-python upgrade that loads another runtime rebuilds
        each engine once - unverified on a GPU, as TensorRT does not install here). An fp16
        plan is built from the graph a converter made (``_fp16_model_bytes``):
        onnxconverter-common, whichever version is installed, or the built-in pass. Two
        images on a shared volume made different engines under one key (review 175)."""
        fields = self._device_fields()
        if options.precision != "fp16":
            return fields
        try:
            from importlib.metadata import version

            converter = version("onnxconverter-common")
        except Exception:  # not installed (PackageNotFoundError), or unreadable
            converter = None
        # max_finite_val: the clamp it is called with (+-1e4 until session 64's fix): an
        # engine converted with another clamp is another engine.
        fields["fp16_converter"] = {"onnxconverter_common": converter, "builtin": FP16_PASS,
                                    "max_finite_val": FP16_MAX}  # fmt: skip
        return fields

    def _device_fields(self) -> dict[str, Any]:
        """The current device's compute capability and SM count, and the loaded CUDA
        runtime's version (an int, 12080 for 12.8)."""
        cuda = _Cuda(_import_cudart())
        props = _device_properties(cuda)
        runtime = cuda.call("cudaRuntimeGetVersion", cuda.rt.cudaRuntimeGetVersion())
        return {
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": int(props.multiProcessorCount),
            "cuda_runtime": int(runtime),
        }

    def build(self, onnx_path: Path, out_dir: Path, options: BuildOptions) -> list[str]:
        """Build ``onnx_path`` into ``out_dir / engine.plan``; returns ``["engine.plan"]``.

        The timing cache for this GPU and TensorRT version (``out_dir.parent /
        timing-<device>-trt<version>.cache``) is read first if present and saved back
        updated; it is not one of the engine's files.
        """
        _check_options(options)
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        if not onnx_path.is_file():
            raise EngineError(f"{onnx_path} does not exist")
        trt = _supported_trt()
        logger = _trt_logger(trt)
        started = time.perf_counter()
        cache_path = out_dir.parent / timing_cache_name(
            self.device(), trt.__version__, options.precision
        )

        try:
            builder = trt.Builder(logger)
        except Exception as exc:  # CUDA could not be initialised
            raise EngineError(f"TensorRT could not create a builder: {exc}") from exc
        if builder is None:
            raise EngineError("TensorRT could not create a builder (is a CUDA device present?)")
        # Strongly typed: opt-in in 10.x (weak typing deprecated since 10.12), always on in
        # 11.x (the flag accepted and ignored); a TensorRT that drops the flag altogether
        # can only be strongly typed. Explicit batch is the only mode since 10.
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        network_flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)

        if options.precision == "fp16":
            # Strongly typed: the graph itself must say fp16.
            model_bytes = _fp16_model_bytes(onnx_path)
        else:
            model_bytes = onnx_path.read_bytes()
        log.info("parsing %s (%.1f MiB)", onnx_path, len(model_bytes) / 2**20)
        # The path lets the parser find weights stored outside the .onnx file.
        if not parser.parse(model_bytes, str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(
                f"TensorRT cannot parse {onnx_path}: " + ("; ".join(errors) or "unknown error")
            )

        config = builder.create_builder_config()
        workspace = options.extra.get("workspace_mib", DEFAULT_WORKSPACE_MIB)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace * 2**20)
        if options.precision == "fp32" and not options.extra.get("tf32", False):
            # TensorRT allows TF32 (10-bit mantissa) matmuls by default: ~1e-3 relative error.
            # "fp32" means fp32 here; BuildOptions(extra={"tf32": True}) trades it for speed.
            config.clear_flag(trt.BuilderFlag.TF32)
        self._add_profile(trt, builder, network, config, options)

        cache = self._timing_cache(config, cache_path)

        log.info(
            "building %s engine (strongly typed network) for %s (batch 1..%d, tuned for %d)",
            options.precision,
            onnx_path,
            options.max_batch,
            options.opt_batch,
        )
        try:
            plan = builder.build_serialized_network(network, config)
        except Exception as exc:  # some TensorRT versions raise rather than return None
            raise EngineError(f"TensorRT cannot build {onnx_path}: {exc}") from exc
        if plan is None:
            raise EngineError(
                f"TensorRT cannot build {onnx_path}; its errors are logged by {log.name!r} above"
            )

        out_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(out_dir / PLAN_FILE, plan)  # (any buffer: IHostMemory)
        self._save_timing_cache(config, cache, cache_path)
        log.info(
            "built %s (%.1f MiB) in %.1f s; timing cache %s",
            out_dir / PLAN_FILE,
            (out_dir / PLAN_FILE).stat().st_size / 2**20,
            time.perf_counter() - started,
            cache_path,
        )
        return [PLAN_FILE]

    @staticmethod
    def _add_profile(trt, builder, network, config, options: BuildOptions) -> None:
        """One optimisation profile for every input with a dynamic axis - ``instances`` of
        them, alike: TensorRT requires each execution context in concurrent use to have
        its own profile where the engine has dynamic shapes (NvInferRuntime.h,
        IExecutionContext), and the engine runs one context per instance at once.

        Axis 0 is the batch: 1 / opt_batch / max_batch. A sequence model's inputs (token
        ids and mask, shape (-1, -1)) have one more dynamic axis, the sequence:
        ``options.sequence`` gives its shortest / tuned-for / longest length, the same
        for every input (the server pads a batch's inputs to one length). Other dims are
        fixed at export (the tier's shapes), so min, opt and max share them. Inputs without
        a dynamic axis need no profile entry.
        """
        profiles = [builder.create_optimization_profile() for _ in range(options.instances)]
        dynamic = []
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)  # e.g. (-1, 3, 32, 32) or (-1, -1) for token ids
            if tensor.is_shape_tensor:
                raise EngineError(
                    f"input {tensor.name!r} is a shape tensor; the tensorrt backend "
                    "supports data inputs only"
                )
            if -1 not in shape:
                continue
            lo, opt, hi = _profile_shapes(tensor.name, shape, options)
            for profile in profiles:
                profile.set_shape(tensor.name, lo, opt, hi)
            dynamic.append(f"{tensor.name} {lo}..{hi}")
        if dynamic:
            for profile in profiles:
                if config.add_optimization_profile(profile) < 0:
                    raise EngineError(f"TensorRT rejected the optimisation profile {dynamic}")
            log.info("%d optimisation profile(s), one per instance (tuned for batch %d): %s",
                     len(profiles), options.opt_batch, dynamic)  # fmt: skip

    @staticmethod
    def _timing_cache(config, cache_path: Path):
        """Attach the device's and version's timing cache (loaded if present, else empty)."""
        data = b""
        if cache_path.is_file():
            data = cache_path.read_bytes()
            log.info("timing cache: %s (%d bytes)", cache_path, len(data))
        cache = None
        if data:
            try:
                cache = config.create_timing_cache(data)
            except Exception as exc:
                log.warning("ignoring unreadable timing cache %s: %s", cache_path, exc)
            if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
                # Written for another GPU or TensorRT version: start afresh (and overwrite).
                log.warning("ignoring timing cache %s: made on another device/version", cache_path)
                cache = None
        if cache is None:
            cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise EngineError("TensorRT refused a new, empty timing cache")
        return cache

    @staticmethod
    def _save_timing_cache(config, cache, cache_path: Path) -> None:
        """Save ``cache`` to ``cache_path``, merged with what other builds saved meanwhile.

        Another process may have built (and saved its timings) since this build loaded the
        file: its entries are combined in first, so neither build's timings are lost. The
        read, merge and rename hold an exclusive lock (``.<cache>.lock``): two replicas
        finishing builds at once each read the file before the other's rename, and one's
        timings were lost. The file is replaced atomically.
        """
        with exclusive(cache_path.with_name(f".{cache_path.name}.lock"), os.O_RDWR | os.O_CREAT):
            TensorRTBackend._merge_and_save(config, cache, cache_path)

    @staticmethod
    def _merge_and_save(config, cache, cache_path: Path) -> None:
        try:
            if cache_path.is_file():
                theirs = config.create_timing_cache(cache_path.read_bytes())
                # False when made by another TensorRT version or device: theirs is dropped.
                if theirs is not None and not cache.combine(theirs, ignore_mismatch=False):
                    log.info("not merging the timing cache %s: other device/version", cache_path)
        except Exception as exc:  # an unreadable file is replaced by this build's cache
            log.warning("not merging the unreadable timing cache %s: %s", cache_path, exc)
        try:
            write_bytes(cache_path, cache.serialize())
        except OSError as exc:  # a cache that cannot be saved only slows later builds
            log.warning("cannot save the timing cache %s: %s", cache_path, exc)

    def load(self, out_dir: Path, options: BuildOptions) -> TensorRTEngine:
        """Deserialise ``out_dir / engine.plan``; EngineError if missing or unusable."""
        path = Path(out_dir) / PLAN_FILE
        if not path.is_file():
            raise EngineError(f"{path} does not exist; build the engine first")
        trt = _supported_trt()
        cuda = _Cuda(_import_cudart())
        logger = _trt_logger(trt)
        try:
            runtime = trt.Runtime(logger)
        except Exception as exc:  # CUDA could not be initialised
            raise EngineError(f"TensorRT could not create a runtime: {exc}") from exc
        if runtime is None:
            raise EngineError("TensorRT could not create a runtime (is a CUDA device present?)")
        try:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as exc:
            raise EngineError(f"TensorRT cannot deserialize {path}: {exc}") from exc
        if engine is None:
            raise EngineError(
                f"TensorRT cannot deserialize {path}: corrupt, or built by another TensorRT "
                "version or for another GPU; rebuild it"
            )
        log.info("loaded %s", path)
        return TensorRTEngine(engine, cuda, max_batch=options.max_batch, source=str(path),
                              keep=(runtime,), contexts=options.instances)  # fmt: skip


def _profile_shapes(name: str, shape: tuple[int, ...], options: BuildOptions):
    """(min, opt, max) shapes of one input: the batch axis from ``options``' batch range,
    every other dynamic axis from ``options.sequence``.

    Example:
        >>> _profile_shapes("ids", (-1, -1), BuildOptions(max_batch=8, sequence=(1, 64, 256)))
        ((1, 1), (4, 64), (8, 256))
    """
    if shape[0] != -1:
        raise EngineError(
            f"input {name!r} has shape {shape}: a dynamic axis needs a dynamic batch axis "
            "(0); export the tier with a dynamic batch"
        )
    batch = (1, options.opt_batch, options.max_batch)
    if -1 in shape[1:] and options.sequence is None:
        raise EngineError(
            f"input {name!r} has shape {shape}: a dynamic axis past the batch needs a "
            "sequence profile (BuildOptions.sequence; a model.yaml with a -1 input dim "
            "gets one from its profiled lengths)"
        )
    shapes = []
    for k in range(3):
        seq = options.sequence[k] if options.sequence is not None else 0
        shapes.append((batch[k], *(seq if d == -1 else d for d in shape[1:])))
    return tuple(shapes)


# --- engine -------------------------------------------------------------------------------


# close(): how long running batches may take to finish before their contexts are left to
# be freed when they end (model_runtime waits RUNNING_WAIT_S, 10 s, before closing engines).
CLOSE_WAIT_S = 10.0


class _Slot:
    """One execution context with its own stream, device buffers and pinned staging
    buffers: it runs one batch at a time, and several slots of one engine run at once."""

    def __init__(self) -> None:
        self.context = None
        self.stream = None
        self.buffers: dict[str, int] = {}  # device addresses
        self.host: dict[str, int] = {}  # pinned host addresses, same sizes
        self.staging: dict[str, np.ndarray] = {}  # flat numpy views of self.host


class TensorRTEngine(Engine):
    """A deserialised engine with ``contexts`` execution contexts (model.yaml's
    ``instances``), each with its own stream and fixed buffers.

    Device buffers and pinned host staging buffers are allocated once per tensor and
    context for ``max_batch`` (the smaller of the load options' and the plan's profile); the
    device ones are bound to their context. ``run`` takes a free context, copies the feeds
    into its pinned buffers, queues the host-to-device copies, the execution and the
    device-to-host copies on its stream, synchronises once, and copies the outputs out of
    the pinned buffers for the actual batch. A context runs one batch at a time; with
    several, batches of one tier run at once (``concurrent_runs``), each on its own stream,
    at the cost of a context's activation memory and buffers each.

    Example:
        >>> engine = TensorRTBackend().load(Path("engines/k"), BuildOptions())  # doctest: +SKIP
        >>> engine.inputs  # doctest: +SKIP
        [TensorSpec(name='input', dtype='float32', shape=(-1, 3, 32, 32))]
        >>> x = np.zeros((2, 3, 32, 32), np.float32)  # batch 2 <= max_batch
        >>> engine.run({"input": x})["logits"].shape  # doctest: +SKIP
        (2, 10)
        >>> engine.close()  # doctest: +SKIP
    """

    backend = "tensorrt"

    def __init__(
        self,
        engine,
        cuda: _Cuda,
        *,
        max_batch: int,
        source: str = "",
        keep: tuple = (),
        contexts: int = 1,
    ) -> None:
        if contexts < 1:
            raise ValueError(f"contexts must be >= 1, got {contexts}")
        trt = _import_trt()
        self._cond = threading.Condition()  # guards _free and _closed
        self._cuda = cuda
        self._source = source or "engine"
        self._keep = keep  # the Runtime must outlive the engine it deserialised
        self._engine = engine
        self._slots: list[_Slot] = []  # every context made
        self._free: list[_Slot] = []  # those not running a batch now
        self._closed = False
        self.inputs, self.outputs = [], []
        try:
            self._setup(trt, max_batch, contexts)
        except BaseException:
            try:
                self._release()
            except EngineError as exc:  # keep the original error; report this one
                log.warning("%s", exc)
            raise
        self._free = list(self._slots)
        self.concurrent_runs = len(self._slots)

    def _setup(self, trt, max_batch: int, contexts: int) -> None:
        engine = self._engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.is_shape_inference_io(name):
                raise EngineError(f"{self._source}: shape tensor {name!r} is not supported")
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
            except TypeError as exc:  # bf16/fp8 I/O: no numpy dtype
                raise EngineError(f"{self._source}: tensor {name!r}: {exc}") from exc
            spec = TensorSpec(name, dtype, tuple(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
            else:
                self.outputs.append(spec)

        # Largest input shapes: the plan's profile max, with the batch axis capped at the
        # requested max_batch (the plan may allow more than this server wants to buffer).
        self._max_shapes: dict[str, tuple[int, ...]] = {}
        capacity = max_batch
        for spec in self.inputs:
            if -1 in spec.shape:
                plan_max = tuple(engine.get_tensor_profile_shape(spec.name, 0)[2])
                if spec.shape[0] == -1:
                    capacity = min(capacity, plan_max[0])
                self._max_shapes[spec.name] = plan_max
            else:
                self._max_shapes[spec.name] = spec.shape
        if not any(s.shape and s.shape[0] == -1 for s in self.inputs) and self.inputs:
            # A static-batch plan: its one batch size is the only one it runs.
            capacity = self.inputs[0].shape[0] if self.inputs[0].shape else 1
        elif capacity < max_batch:
            log.warning(
                "%s: plan allows batch <= %d, less than max_batch=%d",
                self._source,
                capacity,
                max_batch,
            )
        self.max_batch = capacity
        for spec in self.inputs:
            if spec.shape and spec.shape[0] == -1:
                self._max_shapes[spec.name] = (capacity, *self._max_shapes[spec.name][1:])
        dynamic = any(-1 in spec.shape for spec in self.inputs)
        profiles = engine.num_optimization_profiles if dynamic else contexts
        if contexts > profiles:  # (the key holds instances: a plan of another build)
            log.warning("%s: %d contexts asked for, but the plan has %d optimisation profile(s) "
                        "and each context in concurrent use needs its own: %d context(s)",
                        self._source, contexts, profiles, profiles)  # fmt: skip
            contexts = profiles
        for i in range(contexts):
            self._new_slot(i if dynamic else None)
        log.debug(
            "%s: %d context(s), each with %d device + pinned host buffers for batch <= %d: %s",
            self._source,
            contexts,
            len(self.inputs) + len(self.outputs),
            capacity,
            self._max_shapes,
        )

    def _new_slot(self, profile: int | None) -> None:
        """A context bound to buffers of its own, listed in ``_slots`` before anything is
        allocated, so that a failure part-way releases what it holds; on optimisation
        ``profile`` (its own: contexts in concurrent use must not share one) where the
        engine has dynamic shapes."""
        slot = _Slot()
        self._slots.append(slot)
        slot.context = self._engine.create_execution_context()
        if slot.context is None:
            raise EngineError(f"{self._source}: TensorRT could not create an execution context")
        slot.stream = self._cuda.stream_create()
        if profile:  # (a new context is on profile 0)
            if not slot.context.set_optimization_profile_async(profile, int(slot.stream)):
                raise EngineError(
                    f"{self._source}: TensorRT refused optimisation profile {profile}"
                )
            self._cuda.synchronize(slot.stream)  # switched before its shapes are set
        for spec in self.inputs:
            self._set_input_shape(slot, spec.name, self._max_shapes[spec.name])
        # With every input at its largest shape, the outputs are at theirs too.
        for spec in self.outputs:
            shape = tuple(slot.context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineError(
                    f"{self._source}: output {spec.name!r} has a data-dependent shape "
                    f"{shape}; not supported"
                )
            self._max_shapes[spec.name] = shape
        for spec in self.inputs + self.outputs:
            shape = self._max_shapes[spec.name]
            nbytes = int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
            slot.buffers[spec.name] = self._cuda.malloc(nbytes)
            if not slot.context.set_tensor_address(spec.name, slot.buffers[spec.name]):
                raise EngineError(f"{self._source}: TensorRT refused the buffer for {spec.name!r}")
            # Pinned staging: cudaMemcpyAsync from pageable memory is staged and
            # synchronous inside the driver; from page-locked memory it is a real
            # asynchronous DMA.
            slot.host[spec.name] = self._cuda.host_alloc(nbytes)
            slot.staging[spec.name] = _host_array(slot.host[spec.name], nbytes, spec.dtype)

    def _set_input_shape(self, slot: _Slot, name: str, shape: tuple[int, ...]) -> None:
        if not slot.context.set_input_shape(name, shape):
            raise EngineError(f"{self._source}: TensorRT rejected shape {shape} for {name!r}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: ``{input name: array}`` in, ``{output name: array}`` out.

        Dtypes must match ``inputs`` exactly (no silent float64 -> float32 cast) and the
        batch (axis 0) must be 1..``max_batch``; otherwise EngineError names the tensor.
        Waits for a free context where every one is running a batch.
        """
        arrays = check_feeds(self.inputs, feeds, self._max_shapes)
        with self._cond:
            while not self._closed and not self._free:
                self._cond.wait()
            if self._closed:
                raise EngineError(f"{self._source}: engine is closed")
            slot = self._free.pop()
        try:
            return self._run_on(slot, arrays)
        finally:
            with self._cond:
                if self._closed:  # a batch that outlived close(): its context goes now
                    try:
                        self._release([slot])
                    except EngineError as exc:
                        log.warning("%s", exc)
                else:
                    self._free.append(slot)
                self._cond.notify_all()  # a waiting run, or close() counting what is left

    def _run_on(self, slot: _Slot, arrays) -> dict[str, np.ndarray]:
        try:
            return self._queue_and_wait(slot, arrays)
        except BaseException:
            # A failure part-way (the second input's shape rejected, a copy refused) may
            # leave host-to-device copies queued from the pinned staging buffers; once the
            # slot is free again, the next run rewrites those buffers under the DMA
            # (TensorRT: memory bound to the tensors must not change before the stream is
            # synchronised). Let the stream drain first; the original error is the one told.
            try:
                self._cuda.synchronize(slot.stream)
            except Exception as exc:
                log.warning("%s: synchronising after a failed run: %s", self._source, exc)
            raise

    def _queue_and_wait(self, slot: _Slot, arrays) -> dict[str, np.ndarray]:
        cuda = self._cuda
        for spec, array in zip(self.inputs, arrays, strict=True):
            self._set_input_shape(slot, spec.name, array.shape)
            # Every run ends synchronised (_run_on, on failure too), so no copy still reads
            # this staging buffer.
            slot.staging[spec.name][: array.size] = array.reshape(-1)
            cuda.to_device(slot.buffers[spec.name], slot.host[spec.name], array.nbytes,
                           slot.stream)  # fmt: skip
        # The actual output shapes for this batch (e.g. (batch, 10)), known once the inputs'
        # are set; each checked against its buffers, sized at the inputs' largest shapes:
        # an output not monotone in them would overrun both (review helper-231).
        shapes = {}
        for spec in self.outputs:
            shape = tuple(slot.context.get_tensor_shape(spec.name))
            if int(np.prod(shape)) > slot.staging[spec.name].size:
                raise EngineError(
                    f"{self._source}: output {spec.name!r} of shape {shape} is larger than its "
                    f"buffers ({self._max_shapes[spec.name]}, at the inputs' largest shapes)"
                )
            shapes[spec.name] = shape
        if not slot.context.execute_async_v3(int(slot.stream)):
            raise EngineError(f"{self._source}: TensorRT execution failed (see log)")
        for spec in self.outputs:
            nbytes = int(np.prod(shapes[spec.name])) * np.dtype(spec.dtype).itemsize
            cuda.to_host(slot.host[spec.name], slot.buffers[spec.name], nbytes, slot.stream)
        # Everything above is queued on the stream: one synchronisation for the whole run.
        cuda.synchronize(slot.stream)
        # Copies out of the staging buffers, which the context's next run overwrites.
        return {
            name: slot.staging[name][: int(np.prod(shape))].reshape(shape).copy()
            for name, shape in shapes.items()
        }

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Wait for running batches (at most ``timeout_s``), then free every context's
        device and pinned host buffers and stream, and the contexts; further runs fail. A
        batch still running then (a hung engine) keeps its context until it ends: freeing
        memory under a running execution would crash the process, and waiting forever
        would hang the model's unload."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()  # runs waiting for a context: "closed"
            deadline = time.monotonic() + timeout_s
            while len(self._free) < len(self._slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "%s: %d batch(es) still running %.0f s after close: their contexts "
                        "and buffers are freed when they end", self._source,
                        len(self._slots) - len(self._free), timeout_s,
                    )  # fmt: skip
                    break
                self._cond.wait(left)
            self._release(list(self._free))

    def _release(self, slots: list[_Slot] | None = None) -> None:
        """Free ``slots`` (default: every one); the engine itself once none is left."""
        errors = []
        for slot in list(self._slots) if slots is None else slots:
            errors += self._release_slot(slot)
            self._slots.remove(slot)
        self._free = [s for s in self._free if s in self._slots]
        if not self._slots:
            self._engine = None
            self._keep = ()
        if errors:
            raise EngineError(f"{self._source}: releasing GPU resources: {'; '.join(errors)}")

    def _release_slot(self, slot: _Slot) -> list[str]:
        errors = []

        def attempt(call, *args) -> None:
            try:
                call(*args)
            except EngineError as exc:
                errors.append(str(exc))

        if slot.stream is not None:
            attempt(self._cuda.synchronize, slot.stream)  # nothing may still use the buffers
        slot.context = None  # drop the context before the memory bound to it
        for ptr in slot.buffers.values():
            attempt(self._cuda.free, ptr)
        slot.buffers = {}
        slot.staging = {}  # no view may outlive the pinned memory it points into
        for ptr in slot.host.values():
            attempt(self._cuda.free_host, ptr)
        slot.host = {}
        if slot.stream is not None:
            attempt(self._cuda.stream_destroy, slot.stream)
            slot.stream = None
        return errors

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter exit CUDA may already be gone: never raise from a finaliser.
        with contextlib.suppress(Exception):
            self.close()


def _graph_problem(onnx, model) -> str | None:
    """Why ``model`` is not a valid, consistently typed ONNX graph (the checker with strict
    type inference), or None."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError: the first line says which node
        return str(exc).strip().splitlines()[0][:300]
    return None


# onnxconverter-common warns once per constant it clamps into fp16's range.
_CLAMPED = re.compile(r"the float32 number (\S+) will be truncated to (\S+)")


def _report_clamped(caught: list[warnings.WarningMessage], onnx_path: Path) -> None:
    """One log line for the constants onnxconverter-common clamped into fp16's range, in
    place of a UserWarning each (a BERT tier gave three, one "-10000.0 will be truncated to
    -10000.0"): LayerNorm epsilons of 1e-12 become 1e-7, harmless at a hidden state's
    variance - said once, at INFO. Other warnings are passed on."""
    clamped = []
    for w in caught:
        m = _CLAMPED.search(str(w.message))
        if m is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif float(m.group(1)) != float(m.group(2)):
            clamped.append(f"{float(m.group(1)):.3g} -> {float(m.group(2)):.3g}")
    if clamped:
        log.info(
            "fp16: %d constant(s) of %s clamped into fp16's range (%s); epsilons below 1e-7 "
            "(LayerNorm's 1e-12) become 1e-7, which is harmless at activation variances",
            len(clamped), onnx_path.name, ", ".join(sorted(set(clamped))[:5]),
        )  # fmt: skip


def _fp16_model_bytes(onnx_path: Path) -> bytes:
    """The ONNX model at ``onnx_path`` converted to fp16 compute with fp32 inputs/outputs.

    A strongly typed network computes in the precisions the graph states, so fp16 has to be
    in the graph. onnxconverter-common's documented converter is used where installed
    (``pip install innfer[gpu]``): it keeps precision-sensitive ops (Resize, TopK, Range, ...)
    in fp32 behind casts. Otherwise - or where its graph fails the ONNX checker's strict
    type inference - the built-in pass (``fp16.convert_to_fp16``) runs, its graph checked
    the same way (EngineError naming the first problem).
    """
    try:
        import onnx
    except ImportError as exc:
        raise EngineError(
            "fp16 TensorRT engines are built from an fp16 ONNX graph, and converting it needs "
            "the onnx package: pip install onnx"
        ) from exc
    try:
        from onnxconverter_common import float16
    except ImportError:
        float16 = None
    try:
        model = onnx.load(str(onnx_path))  # also loads weights stored beside the file
        half = None
        if float16 is not None:
            log.info("converting %s to fp16 with onnxconverter-common", onnx_path)
            # keep_io_types: callers keep feeding and reading fp32, as the engine's I/O says.
            # max_finite_val: fp16's own range - the converter's default clamps constants
            # to +-1e4, so a folded BatchNorm scale in (1e4, 65504] changed, and the two
            # converters built different engines (review helper-231).
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    half = float16.convert_float_to_float16(
                        model, keep_io_types=True, max_finite_val=FP16_MAX, min_positive_val=1e-7
                    )
                except Exception as exc:  # e.g. "already converted to float16": any fp16
                    # in the graph (fp16 I/O, x.half() inside), which the built-in pass
                    # converts - it failed the build with stale advice (review helper-268)
                    half, problem = None, f"it refused it: {str(exc).splitlines()[0][:200]}"
            _report_clamped(caught, onnx_path)
            if half is not None:
                problem = _graph_problem(onnx, half)
            if problem is not None:
                # onnxconverter-common 1.15-1.16 keep Cast(to=float) nodes but declare their
                # outputs fp16 (its issue 320): every text tier has such casts (the mask).
                log.warning(
                    "onnxconverter-common %s made no valid fp16 graph of %s (%s); "
                    "building it with the built-in pass (runtime.engines.fp16) instead",
                    getattr(sys.modules.get("onnxconverter_common"), "__version__", "?"),
                    onnx_path, problem,
                )  # fmt: skip
                half = None
                model = onnx.load(str(onnx_path))  # the converter may have edited it
        else:
            log.info(
                "converting %s to fp16 with the built-in pass (runtime.engines.fp16; "
                "install onnxconverter-common for the documented converter)",
                onnx_path,
            )
        if half is None:
            half = convert_to_fp16(model)
            # Checked like the converter's: TensorRT's parser reports a mistyped graph far
            # less clearly (or builds it with casts nobody asked for).
            problem = _graph_problem(onnx, half)
            if problem is not None:
                raise EngineError(f"the built-in fp16 pass made an invalid graph: {problem}")
        return half.SerializeToString()
    except Exception as exc:  # either converter: a graph it cannot convert is a build error
        raise EngineError(
            f"cannot convert {onnx_path} to fp16: {exc}; build this model at precision: fp32 "
            "(model.yaml)"
        ) from exc

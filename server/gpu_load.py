"""Outside load on a GPU, read from NVML: how much slower the device runs now because of
other processes' work, for the scheduler's latency model (``LatencyModel.set_external``).

Several servers (or a training job, a notebook) may share one GPU. Their kernels time-slice
with ours, so our batches run slower than profiled while they are busy. The latency model
learns that from our own batches, but only after they ran late; NVML sees the other
processes at once. One ``NvmlLoad`` per GPU in use samples, every ``POLL_S``:

* the device's utilisation ``total`` (``nvmlDeviceGetUtilizationRates(h).gpu``: the share of
  the last sample period in which any kernel ran), and
* **our own share** ``ours``: the larger of two estimates, either of which may be missing -
  NVML's per-process samples for ``os.getpid()`` since the last read
  (``nvmlDeviceGetProcessUtilization``; unsupported on some products, and blind to us in a
  container, where NVML reports the host's PIDs), and the share of wall time our engines
  were busy on the device (``own_busy``: the data plane's engine seconds). The larger,
  because counting our own work as others' would make plans slower the more we serve - a
  feedback loop - while missing some outside work only leaves it to the learned level.
  With neither known (the first read without NVML's samples) nothing is reported.

then ``others = clip(total - ours, 0, OTHERS_MAX)``, smoothed by an EWMA, and reports
``factor = 1 / (1 - others)`` per device: with the GPU time-sliced between us and processes
holding ``others`` of it, our kernels get ``1 - others`` of the time. That is a model, not a
measurement: overlapping kernels of small models share the SMs better than that (the factor
overstates), and the learned level corrects the residual either way.

The reader runs on a daemon thread and calls ``on_factor(index, factor)`` from it: the caller
(``server.dataplane``) hands the value to the event loop with ``call_soon_threadsafe``
because the scheduler is not thread-safe. ``pynvml`` (the ``nvidia-ml-py`` package, extra
``gpu``) is imported only when a GPU model loads; without it, or when NVML fails to
initialise, the reader is disabled with one info line and the scheduler plans as before.
The tests script a stand-in ``pynvml``; the tests marked ``gpu`` read a real H200's NVML
(an idle device, another process saturating it, our own kernels).

Example:
    >>> others_factor(total=0.8, ours=0.3)       # others hold half the GPU: 2x slower
    2.0
    >>> others_factor(total=0.2, ours=0.5), round(others_factor(total=1.0, ours=0.0), 6)
    (1.0, 10.0)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("innfer.gpu_load")

# Seconds between reads. NVML's utilisation is an average over its own sample period (1/6 s
# to 1 s by product); reading faster only repeats it, slower leaves plans behind a change.
POLL_S = 0.5
# The largest share of the device counted as others' (the factor's cap, 10x: the latency
# model's EXTERNAL_MAX). A saturated reading says "at least this much", not "infinitely".
OTHERS_MAX = 0.9
# Weight of the newest read in the others' share EWMA. Successive reads jitter by a sample
# period's worth of kernels; at 0.5 the variance of a steady reading drops to a third
# (alpha / (2 - alpha)) while a step is 75 % there after 2 reads (1 s) and 94 % after 4.
# The share is smoothed, not the factor: 1 / (1 - x) is convex, and one read near
# OTHERS_MAX would pull an average of factors up by several x.
SMOOTH_ALPHA = 0.5


def others_factor(total: float, ours: float) -> float:
    """``1 / (1 - others)``, others = ``total`` - ``ours`` (shares of the device's time, 0..1)
    clipped to [0, ``OTHERS_MAX``].

    Example:
        >>> round(others_factor(0.95, 0.05), 6)
        10.0
    """
    others = min(max(total - ours, 0.0), OTHERS_MAX)
    return 1.0 / (1.0 - others)


def gpu_index(served) -> int | None:
    """The CUDA device index a served model's engines run on, None where they run on a
    CPU: an engine's ``device`` attribute ``"cuda"`` / ``"cuda:N"`` (the torch backend), or
    the tensorrt backend (the process's current CUDA device: 0, as ``runtime.engines
    .tensorrt`` never changes it).

    Example:
        >>> from types import SimpleNamespace as S
        >>> gpu_index(S(backend="torch", engines={"w100": S(device="cuda:1")}))
        1
        >>> gpu_index(S(backend="onnxruntime", engines={"w100": S()})) is None
        True
    """
    for engine in served.engines.values():
        device = getattr(engine, "device", None)
        if isinstance(device, str) and device.startswith("cuda"):
            _, _, n = device.partition(":")
            return int(n) if n.isdigit() else 0
    return 0 if served.backend == "tensorrt" else None


def nvml_handle(nvml, cuda_index: int):
    """NVML's handle for CUDA device ``cuda_index``. NVML numbers every GPU of the host
    (in a container: those mounted into it) and ignores ``CUDA_VISIBLE_DEVICES``, so the
    index is mapped through it: an entry that is a number is NVML's index, a ``GPU-...``
    UUID is looked up. Assumes CUDA and NVML order the GPUs alike (PCI bus order: set
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` on a host with different GPUs; one GPU per pod, as
    Kubernetes usually gives, is always right)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if cuda_index < len(entries):
            entry = entries[cuda_index]
            if entry.isdigit():
                return nvml.nvmlDeviceGetHandleByIndex(int(entry))
            return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


class NvmlLoad:
    """Samples one GPU's outside load every ``interval_s`` on a daemon thread and calls
    ``on_factor(index, factor)`` with it (see the module's docstring for the estimate).

    ``interval_s``: seconds between reads (default ``POLL_S``). ``own_busy``: cumulative
    seconds this process's engines have been busy on the device (any monotone counter; None
    where unknown) - the fallback for our own share. ``nvml``: the pynvml module (default:
    imported here); ``clock``: monotonic seconds.
    ``start()`` returns False, with one info line, where NVML cannot be used; ``stop()``
    ends and joins the thread. ``sample()`` is one read (the thread's body).

    Example:
        >>> seen = []
        >>> reader = NvmlLoad(0, lambda i, f: seen.append((i, f)), nvml=None)
        >>> reader.start()   # no pynvml here: disabled, no thread  # doctest: +SKIP
        False
    """

    def __init__(
        self,
        index: int,
        on_factor: Callable[[int, float], None],
        own_busy: Callable[[], float | None] | None = None,
        interval_s: float | None = None,
        alpha: float = SMOOTH_ALPHA,
        nvml=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.on_factor = on_factor
        self.own_busy = own_busy
        self.interval_s = POLL_S if interval_s is None else interval_s
        self.alpha = alpha
        self.clock = clock
        self.nvml = nvml
        self.factor: float | None = None  # the last reported factor
        self._others: float | None = None  # the smoothed others' share
        self._handle = None
        self._last_ts = 0  # NVML's per-process samples are read from this timestamp (us)
        self._busy: tuple[float, float] | None = None  # (clock, own_busy) at the last read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        # Whether any NVML sample carried this process's PID: in a container NVML reports
        # host PIDs, so ours never shows, and "only others have samples" is not known.
        self._pid_seen = False

    def start(self) -> bool:
        """Initialise NVML and start the thread; False (and no thread) where pynvml does not
        import, NVML does not initialise or the device has no handle."""
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
        except Exception as exc:  # no package, no driver, no GPU: plan as before
            log.info("GPU %d: NVML unavailable (%s); outside load is not planned for",
                     self.index, exc)  # fmt: skip
            return False
        try:
            self._handle = nvml_handle(self.nvml, self.index)
        except Exception as exc:
            log.info("GPU %d: no NVML handle (%s); outside load is not planned for",
                     self.index, exc)  # fmt: skip
            self._shutdown()
            return False
        try:  # (a MIG slice: NOT_SUPPORTED - every read failed, polled for ever; helper-289)
            self.nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception as exc:
            log.info("GPU %d: NVML cannot read its utilisation (%s; a MIG slice?); outside "
                     "load is not planned for", self.index, exc)  # fmt: skip
            self._shutdown()
            return False
        self._skip_history()
        self._thread = threading.Thread(target=self._run, name=f"nvml-load-{self.index}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return True

    def _skip_history(self) -> None:
        """Start the per-process samples from now. Asked from timestamp 0, NVML answers over
        its whole buffer: on an H200 the first read, 0.2 s into our own saturating kernels,
        gave this process a share averaged over seconds it was idle (and exited processes
        theirs), so our kernels counted as outside load: factor 10, decaying over 2 s."""
        with contextlib.suppress(Exception):  # NOT_FOUND (no samples yet), unsupported
            samples = self.nvml.nvmlDeviceGetProcessUtilization(self._handle, 0)
            self._last_ts = max([self._last_ts, *(int(s.timeStamp) for s in samples)])

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread (after its current read) and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
            self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to release
            self.nvml.nvmlShutdown()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):  # the first read one interval in
            try:
                self.sample()
            except Exception as exc:  # one bad read must not end the reader
                self._failures += 1
                if self._failures in (1, 100):  # once, and once more if it keeps failing
                    log.warning("GPU %d: NVML read failed (%s)", self.index, exc)

    def sample(self) -> float | None:
        """One read: the smoothed factor reported to ``on_factor``, or None when our own
        share is unknown (nothing reported)."""
        total = self.nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
        shares = [s for s in (self._nvml_share(), self._busy_share()) if s is not None]
        if not shares:
            return None
        others = min(max(total - min(max(shares), 1.0), 0.0), OTHERS_MAX)
        if self._others is None:
            self._others = others
        else:
            self._others += self.alpha * (others - self._others)
        self.factor = 1.0 / (1.0 - self._others)
        self.on_factor(self.index, self.factor)
        return self.factor

    def _nvml_share(self) -> float | None:
        """Our share per NVML's per-process samples since the last read: the mean SM
        utilisation of this PID's samples, 0 when only others have samples; None where NVML
        cannot say (unsupported, or no samples of anyone - an idle GPU reads the same), and
        where no sample has ever carried our PID: in a container NVML reports host PIDs,
        and 0 counted our own kernels as outside load - factor 10 at the first read
        (review helper-289)."""
        nvml = self.nvml
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(self._handle, self._last_ts)
        except Exception as exc:
            if getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NOT_FOUND", object()):
                return 0.0  # no process ran kernels since the last read: neither did we
            return None
        if not samples:
            return None
        self._last_ts = max(self._last_ts, *(int(s.timeStamp) for s in samples))
        ours = [s.smUtil for s in samples if s.pid == os.getpid()]
        if ours:
            self._pid_seen = True
            return sum(ours) / len(ours) / 100.0
        return 0.0 if self._pid_seen else None

    def _busy_share(self) -> float | None:
        """The share of wall time since the last read our engines were busy, by
        ``own_busy``; None on the first read, without it, or when the counter went back (a
        model unloaded)."""
        if self.own_busy is None:
            return None
        busy, now = self.own_busy(), self.clock()
        last, self._busy = self._busy, (now, busy) if busy is not None else None
        if busy is None or last is None or now <= last[0] or busy < last[1]:
            return None
        return min((busy - last[1]) / (now - last[0]), 1.0)

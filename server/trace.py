"""Request traces in Triton's trace format: the timestamps of sampled requests, written as
JSON to the server config's ``trace.file``, and their settings read and changed while the
server runs through Triton's trace extension (the ``TraceSetting`` RPC, REST
``/v2[/models/<m>]/trace/setting``) - what ``tritonclient``'s ``get_trace_settings`` /
``update_trace_settings`` and perf_analyzer's ``--trace-*`` flags speak. No grpc.

Settings, globally and per model (a model's unset ones follow the global ones):
  * ``trace_level``: ``["OFF"]`` or ``["TIMESTAMPS"]`` (TENSORS is refused: innfer records
    no tensors);
  * ``trace_rate``: one request in this many is traced (counted per model);
  * ``trace_count``: how many more to trace, -1 for no end; it counts down as traces are
    taken, and tracing stops at 0;
  * ``log_frequency`` (global only: one sequence of files for every model): 0 writes every
    trace to ``trace_file`` when the server stops (past ``MAX_PENDING`` held, each that
    many to ``<trace_file>.<k>``); N > 0 writes each N traces to ``<trace_file>.<k>``,
    k = 0, 1, ...;
  * ``trace_file``: read only, as in Triton since 2024 (a client choosing a path the
    server writes was a security issue): set it in the server config.

A trace is one JSON object per request: ``id``, ``model_name``, ``model_version``,
``request_id``, ``tier`` (innfer's: the tier that answered) and ``timestamps``, a list of
``{"name", "ns"}`` on the monotonic clock - REQUEST_START (the request reached the data
plane), QUEUE_START (handed to the scheduler), COMPUTE_START and COMPUTE_END (its batch on
the engine: from the scheduler's own queue and compute times), REQUEST_END (answered, or
failed); around them the frontend's, as Triton's (its trace_summary.py picks a frontend's
traces by them, and printed nothing for innfer's before): a gRPC request's
GRPC_WAITREAD_START (the transport began reading the message) and GRPC_WAITREAD_END (its
handler had it), GRPC_SEND_START (the answer made; on a stream, its write began - after
any earlier answer it waited behind) and GRPC_SEND_END (a unary call ended; a stream's
answer written); a REST call's HTTP_RECV_START, HTTP_RECV_END (its body read),
HTTP_SEND_START and HTTP_SEND_END (written) - no send stamps where no answer was sent (a
REST failure, a client gone). A file holds a JSON array of them.
A model's own settings start as a copy of the global ones when a client first sets one
(Triton's rule): its ``trace_count`` counts down on its own from there.

Example:
    >>> traces = RequestTraces(TraceConfig(file=Path("t.json"), level="TIMESTAMPS", rate=1,
    ...                                    count=1))
    >>> t = traces.start("mnist", "req-1")
    >>> t.stamp("REQUEST_START"); traces.finish(t)
    >>> traces.start("mnist", "req-2") is None  # trace_count was 1
    True
    >>> traces.settings("mnist")["trace_count"]
    ['0']
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runtime.atomic import probe_write, write_json
from runtime.configspec import spec
from server.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("innfer.trace")

# spec() returns a dataclasses.field() carrying the rules; ruff cannot see that.
# ruff: noqa: RUF009

LEVELS = ("OFF", "TIMESTAMPS")
KEYS = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency")
# Traces held for the stop's write where log_frequency is 0: past this many they go to
# <file>.<k> each (said once) - 1.5 kB a trace, unbounded, and one write at the stop that
# outran the pod's grace (review helper-247: 100,000 traces, 9 s and 430 MB more).
MAX_PENDING = 10_000
_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """``trace:`` in the server config: where traces go and the global settings at start
    (clients may change all but the file while the server runs)."""

    file: Path | None = spec(
        None, doc="JSON file the traces are written to (null: tracing cannot be turned on)"
    )
    level: str = spec("OFF", choices=LEVELS, doc="OFF, or TIMESTAMPS to trace requests")
    rate: int = spec(1000, lo=1, hi=2**31 - 1, doc="one request in this many is traced")
    count: int = spec(-1, lo=-1, hi=2**31 - 1, doc="traces to take, -1 for no end")
    log_frequency: int = spec(
        0, lo=0, hi=2**31 - 1,
        doc="0: write the traces when the server stops; N: write each N to <file>.<k>",
    )  # fmt: skip


@dataclass
class Trace:
    """One sampled request's record; ``stamp`` adds a timestamp (monotonic ns)."""

    id: int
    model_name: str
    request_id: str
    timestamps: list[dict] = field(default_factory=list)
    tier: str | None = None

    def stamp(self, name: str, ns: int | None = None) -> None:
        self.timestamps.append({"name": name, "ns": time.monotonic_ns() if ns is None else ns})

    def record(self) -> dict:
        out = {"id": self.id, "model_name": self.model_name, "model_version": 1,
               "request_id": self.request_id}  # fmt: skip
        if self.tier is not None:
            out["tier"] = self.tier
        return {**out, "timestamps": self.timestamps}


# A frontend's stamps: (reading from, read to, sending from, sent to), Triton's names.
GRPC_STAMPS = ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END")
HTTP_STAMPS = ("HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END")


def as_ns(monotonic_s: float) -> int:
    """``time.monotonic()`` seconds as a stamp's nanoseconds (``time.monotonic_ns``'s clock)."""
    return int(monotonic_s * 1e9)


@dataclass(slots=True)
class Transport:
    """A frontend's part of one request's trace: when it read the request (monotonic ns),
    stamped by the data plane if the request is traced, which then leaves the trace here
    (``trace``) for ``RequestTraces.sent`` once the answer has gone.

    Example:
        >>> t = Transport(GRPC_STAMPS, read_from_ns=1_000, read_to_ns=2_000)
        >>> # resp = await plane.infer(..., transport=t); answer sent, then:
        >>> traces.sent(t, send_start_ns)  # doctest: +SKIP
    """

    names: tuple[str, str, str, str]
    read_from_ns: int
    read_to_ns: int
    trace: Trace | None = None

    def received(self, trace: Trace) -> None:
        """Stamp the reading on ``trace`` (first: it came before the handler)."""
        trace.stamp(self.names[0], self.read_from_ns)
        trace.stamp(self.names[1], self.read_to_ns)


class RequestTraces:
    """The trace settings (global and per model), the sampling, and the file writer. Used
    on the event loop; files are written on a thread of their own."""

    def __init__(self, config: TraceConfig) -> None:
        self.file = config.file
        self._global = {
            "trace_level": config.level, "trace_rate": config.rate,
            "trace_count": config.count, "log_frequency": config.log_frequency,
        }  # fmt: skip
        # What a client's clearing of a global setting brings back (Triton's rule): the
        # server config's values, not the last a client set.
        self._start = dict(self._global)
        self._models: dict[str, dict] = {}  # a model's own settings (unset: the global ones)
        self._seen: dict[str, int] = {}  # requests per model, for trace_rate
        self._ids = itertools.count(1)
        self._pending: list[dict] = []  # finished traces not yet written
        self._index = 0  # the next <file>.<k>
        self._closed = False
        self._spilled = False  # MAX_PENDING reached with log_frequency 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="innfer-trace")
        if config.level != "OFF" and (why := self.unwritable()) is not None:
            raise ValueError(f"trace.level TIMESTAMPS: {why}")

    # -- settings ------------------------------------------------------------------------
    def settings(self, model: str = "") -> dict[str, list[str]]:
        """The settings in force for ``model`` ("" : the global ones), as Triton answers
        them: every value a list of strings."""
        got = {**self._global, **self._models.get(model, {})} if model else self._global
        return {
            "trace_file": [str(self.file) if self.file is not None else ""],
            "trace_level": [got["trace_level"]],
            "trace_rate": [str(got["trace_rate"])],
            "trace_count": [str(got["trace_count"])],
            "log_frequency": [str(got["log_frequency"])],
        }

    def update(self, model: str, changes: dict[str, list[str]]) -> None:
        """Apply ``changes`` (name -> values; no values clears a model's own setting, so it
        follows the global one again, or a global one back to the server config's value, as
        Triton's do) to ``model``'s settings, or the global ones for "". Every change is
        checked first: a bad one changes nothing (InvalidArgument)."""
        parsed: dict[str, object] = {}
        for key, values in changes.items():
            if key == "trace_file":
                raise InvalidArgument(
                    "trace_file cannot be changed by a client (a client choosing a path the "
                    "server writes; Triton refuses it too): set trace.file in the server "
                    "config"
                )
            if key not in KEYS:
                raise InvalidArgument(f"unknown trace setting {key!r}; known: {', '.join(KEYS)}")
            if key == "log_frequency" and model:  # (one buffer: a model's N flushed the
                raise InvalidArgument(  # others' traces and split its own - helper-247)
                    "log_frequency is global (one sequence of trace files for every model): "
                    "set it without a model name"
                )
            parsed[key] = _parse(key, values)
            if parsed[key] is None and not model:
                parsed[key] = self._start[key]
        level = parsed.get("trace_level")
        if level not in (None, "OFF") and (why := self.unwritable()) is not None:
            raise FailedPrecondition(f"trace_level TIMESTAMPS: {why}")
        if model and model not in self._models:  # a copy of the global ones (Triton's rule;
            # log_frequency stays global)
            self._models[model] = {k: v for k, v in self._global.items() if k != "log_frequency"}
        target = self._models[model] if model else self._global
        for key, value in parsed.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        if model and not target:
            self._models.pop(model, None)

    def unwritable(self) -> str | None:
        """Why traces cannot be written to ``trace_file`` (None: they can): no file set, or
        a folder that cannot be made or written - found at start or when a client turns
        tracing on, not as a warning at the stop that lost them (review helper-247)."""
        if self.file is None:
            return "no trace file: set trace.file in the server config"
        folder = Path(self.file).parent
        try:
            probe_write(folder, prefix=".innfer-trace-")
        except OSError as exc:
            return f"cannot write trace files in {folder}: {exc.strerror or exc}"
        return None

    # -- traces --------------------------------------------------------------------------
    def start(self, model: str, request_id: str) -> Trace | None:
        """A trace for this request of ``model`` if the settings sample it, else None.
        On every request's path: with tracing off and no model's own settings, one lookup."""
        own = self._models.get(model)
        if own is None and self._global["trace_level"] == "OFF":
            return None
        s = self._global if own is None else {**self._global, **own}
        if s["trace_level"] == "OFF" or s["trace_count"] == 0:
            return None
        seen = self._seen[model] = self._seen.get(model, 0) + 1
        if seen % s["trace_rate"]:
            return None
        if s["trace_count"] > 0:  # counted down where it was set: the model's or global
            owner = (
                self._models[model]
                if "trace_count" in self._models.get(model, {})
                else self._global
            )
            owner["trace_count"] -= 1
        return Trace(next(self._ids), model, request_id)

    def sent(self, transport: Transport, send_start_ns: int | None) -> None:
        """The answer of ``transport``'s request left (or its call ended without one:
        ``send_start_ns`` None): its trace, if any, gets the send stamps - from
        ``send_start_ns`` to now - and is finished. Once: a second call does nothing."""
        trace, transport.trace = transport.trace, None
        if trace is None:
            return
        if send_start_ns is not None:
            trace.stamp(transport.names[2], send_start_ns)
            trace.stamp(transport.names[3])
        self.finish(trace)

    def finish(self, trace: Trace) -> None:
        """``trace`` is complete: kept, and written when ``log_frequency`` says. After
        ``close`` (a request the stop's grace left running) it is dropped."""
        if self._closed:
            return
        self._pending.append(trace.record())
        every = self._global["log_frequency"]
        if not every and len(self._pending) >= MAX_PENDING:
            if not self._spilled:
                log.warning(
                    "%d traces held for the stop's write (log_frequency 0): writing each %d "
                    "to %s.<k> from now on; set trace.log_frequency to choose", MAX_PENDING,
                    MAX_PENDING, self.file,
                )  # fmt: skip
            self._spilled = True
            every = MAX_PENDING
        if every and len(self._pending) >= every:
            batch, self._pending = self._pending, []
            path = Path(f"{self.file}.{self._index}")
            self._index += 1
            self._writer.submit(self._write, path, batch)

    def close(self) -> None:
        """Write what is pending (to ``trace_file`` itself, or the next ``<file>.<k>``), on
        the writer thread: called once, on the event loop, when the server stops; ``wait``
        (off the loop) waits for the writes."""
        self._closed = True
        if self._pending and self.file is not None:
            every = self._global["log_frequency"] or self._spilled
            path = Path(f"{self.file}.{self._index}") if every else self.file
            self._writer.submit(self._write, path, self._pending)
            self._pending = []
        self._writer.shutdown(wait=False)

    def wait(self) -> None:
        """Block until every write ``close`` left is done."""
        self._writer.shutdown(wait=True)

    def _write(self, path: Path, records: list[dict]) -> None:
        try:
            write_json(path, records)  # (one writer thread: files in order, never two at once)
        except OSError as exc:  # a full disk or a gone folder: said, never the server's end
            log.warning("could not write %d trace(s) to %s: %s", len(records), path, exc)


def _parse(key: str, values: list[str]) -> object:
    """One setting's new value from its strings; None: cleared."""
    if not values:
        return None
    if key == "trace_level":
        if len(values) != 1 or values[0] not in LEVELS:
            raise InvalidArgument(
                f"trace_level {values}: innfer traces ['OFF'] or ['TIMESTAMPS'] (it records "
                "no TENSORS)"
            )
        return values[0]
    lo = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}[key]
    if len(values) != 1 or not _WHOLE_NUMBER.fullmatch(values[0]):  # (int() took "1_000")
        raise InvalidArgument(f"{key}: one whole number, got {values}")
    number = int(values[0])
    if not lo <= number < 2**31:
        raise InvalidArgument(f"{key}: a whole number in [{lo}, {2**31 - 1}], got {number}")
    return number


def trace_file_problem(config: TraceConfig) -> str | None:
    """What ``innfer serve`` would refuse of ``config`` at start (``RequestTraces``' check),
    found without writing anything: a trace file whose folder neither is writable nor can
    be made (``innfer config check`` said "ok" to a file serve then refused: review
    helper-276). None where tracing is off or the folder will do.

    Example:
        >>> said = trace_file_problem(TraceConfig(level="TIMESTAMPS", file=Path("/proc/t.json")))
        >>> said.startswith("trace.level TIMESTAMPS: cannot write trace files in /proc: ")
        True
    """
    if config.level == "OFF":
        return None
    if config.file is None:
        return "trace.level TIMESTAMPS: no trace file: set trace.file in the server config"
    folder = Path(config.file).parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the one serve's mkdir would make the rest in
    try:  # (a file made and removed: os.access says yes to root on /proc)
        fd, probe = tempfile.mkstemp(prefix=".innfer-trace-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return (
            f"trace.level TIMESTAMPS: cannot write trace files in {folder}: {exc.strerror or exc}"
        )
    return None

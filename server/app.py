"""``innfer serve``: start the gRPC server, the metrics endpoint, and shut down gracefully.

SIGTERM / SIGINT: readiness goes false at once (Kubernetes stops routing), the calls gRPC
holds reach a handler (answered UNAVAILABLE; reset by gRPC's stop, they were CANCELLED,
which clients do not retry), then the gRPC server
sends GOAWAY on every connection and closes its port (clients move their new calls to other
replicas without failing them), in-flight requests finish, then the process exits - bounded
by the grace period. A call that still reaches the data plane (sent before the GOAWAY
arrived) is answered UNAVAILABLE.

Example:
    >>> asyncio.run(serve(ServerConfig.from_dict({"repository": "models"})))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import grpc

from runtime import __version__
from server import bearer_token as bearer
from server.allocator import malloc_settings, tune_malloc
from server.certificates import Certificates
from server.config import ServerConfig, loopback
from server.daemon_call import in_daemon_thread
from server.dataplane import DataPlane
from server.limits import stream_limits_warning
from server.metrics import Metrics
from server.pending import PendingProbe
from server.ports import port_in_use
from server.proto_gen import grpc_service_pb2 as pb
from server.proto_gen import health_pb2
from server.repository_poll import RepositoryPoller
from server.rest import RestFrontEnd
from server.service import (
    HealthService,
    InferenceService,
    add_health_service,
    add_inference_service,
    add_reflection_service,
)

log = logging.getLogger("innfer.server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log pipelines (Loki, Cloud Logging) parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Seconds a stop waits for auto-tiering's work directories to be removed.
TIERERS_STOP_S = 2.0


def setup_logging(level: str = "INFO") -> None:
    """JSON lines on stderr at ``level`` (any case: "info" is INFO; logging's own setLevel
    knows upper case only, and the MiniLM demo's "info" stopped it before it served) -
    innfer's loggers (``innfer.*``) at ``level``, the libraries' at INFO at the lowest.

    Example:
        >>> setup_logging("warning")  # doctest: +SKIP
    """
    if str(level).upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.getLevelName(str(level).upper())
    # DEBUG is innfer's own: at the root it let grpc log a line per call ("Loaded running
    # loop", 364 lines of 364 new ones under a little load) and nothing of innfer's.
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("innfer").setLevel(level)


class Server:
    """The running server; ``start`` returns once it listens, ``wait`` until it stopped."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics(version=__version__)
        self.plane = DataPlane(config, self.metrics)
        self.grpc: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.message_limit = 0  # bytes, either way; set by start
        self._http = None
        self._stopped = asyncio.Event()
        self.cut_short = False  # a stop's grace ran out with a model still stopping
        self.token: bearer.BearerToken | None = None
        self.certificates: Certificates | None = None
        self._following: list[asyncio.Future] = []  # the token's and certificate's files
        self.poller: RepositoryPoller | None = None  # model_control: poll
        self.rest: RestFrontEnd | None = None  # http_port
        self._polling: asyncio.Future | None = None
        self.probe: PendingProbe | None = None  # gRPC's queue, measured (server.pending)

    async def start(self) -> None:
        warn_cleartext_token(self.config)
        if (said := stream_limits_warning(self.config.limits)) is not None:
            log.warning("%s", said)
        limit = self.message_limit = self.config.max_message_bytes or self.plane.message_limit()
        self.plane.transport_limit = limit
        log.info("gRPC messages up to %.1f MiB", limit / 2**20)
        opts = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *connection_options(self.config),
        ]
        auth = self.config.auth
        self.token = None if auth is None else bearer.BearerToken(
            auth.token, auth.bearer_token_file, auth.rotation_grace_s
        )  # fmt: skip
        service = InferenceService(self.plane, self.token)
        # With auth on, an interceptor refuses a call without the token before its request
        # is parsed (server.service.AuthInterceptor).
        self.grpc = grpc.aio.server(options=opts, interceptors=service.interceptors() or None)
        add_inference_service(service, self.grpc)
        add_health_service(HealthService(self.plane), self.grpc)
        if self.config.tls is None:  # (a TLS server would need client credentials of its own)
            probes = self.metrics.pending_probes
            self.probe = PendingProbe(
                self.metrics.pending_wait.observe, lambda outcome: probes.labels(outcome).inc()
            )
            self.grpc.add_generic_rpc_handlers((self.probe.handler(),))
        if self.config.reflection:
            _enable_reflection(self.grpc)
        address = f"{grpc_host(self.config.host)}:{self.config.grpc_port}"
        try:
            if self.config.tls is None:
                self.port = self.grpc.add_insecure_port(address)
            else:
                self.certificates = Certificates(self.config.tls)
                self.port = self.grpc.add_secure_port(address, self.certificates.credentials())
        except RuntimeError as exc:  # grpc says "Failed to bind to address ...; set GRPC_..."
            raise OSError(*_bind_problem(self.config.host, self.config.grpc_port)) from exc
        if self.config.metrics_port or self.config.metrics_port == 0:
            port = self.config.metrics_port
            try:
                self._http, _ = self.metrics.serve_http(port, self.config.host)
            except OSError as exc:
                said = (
                    f"metrics port {port} is in use on {self.config.host} (metrics_port in "
                    "the server config / --metrics-port)"
                )
                error = port_in_use(exc, said)
                if error is None:
                    raise
                raise error from exc
            self.metrics_port = self._http.server_port
        if self.config.http_port is not None:
            ssl = None if self.certificates is None else self.certificates.ssl_context()
            self.rest = RestFrontEnd(service, self.config, ssl)
            await self.rest.start(limit)
        await self.grpc.start()
        if self.probe is not None:
            self.probe.start(f"{probe_host(self.config.host)}:{self.port}")
        self._follow_secrets()
        rest = "" if self.rest is None else f", REST :{self.rest.port}"
        log.info("listening on %s:%d (metrics :%d%s)", self.config.host, self.port,
                 self.metrics_port, rest)  # fmt: skip
        if self.config.model_control == "poll":
            self.poller = RepositoryPoller(self.plane, self.config.repository_poll_s)
            await self.poller.baseline()  # before the loads: what changes meanwhile reloads
        await self.plane.load_all()
        if self.poller is not None and not self.plane.closing.is_set():
            self._polling = asyncio.ensure_future(self.poller.run())
        why = self.plane.not_ready_reason()
        if why is None:
            log.info("ready: models %s", list(self.plane.models))
        else:  # it said "ready" while readiness answered NOT_SERVING
            log.warning("started, not ready (%s); serving models %s", why, list(self.plane.models))

    def _follow_secrets(self) -> None:
        """Start following the files of the bearer token and the TLS certificate, if any."""
        followed = []
        if self.token is not None and self.token.path is not None:
            followed.append((self.token.read, self.token.rotate))
        if self.certificates is not None:
            followed.append((self.certificates.read, self.certificates.offer))
        # One task each: a read that hangs (a FIFO in a file's place) held up the other.
        self._following = [asyncio.ensure_future(_follow(read, apply)) for read, apply in followed]
        for task in self._following:
            task.add_done_callback(_said_if_died)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop admitting, let in-flight requests finish (<= grace), then close."""
        grace = self.config.grace_period_s if grace is None else grace
        for task in (*self._following, self._polling):
            if task is not None:
                task.cancel()
        if self.poller is not None:
            self.poller.cancel()
        if self.probe is not None:
            self.probe.stop()
        self.plane.drain()  # open streams stop reading; a call reaching the plane: UNAVAILABLE
        self.plane.stop_tierers()
        log.info("draining %d in-flight requests (grace %.1f s)", self.plane.inflight(), grace)
        deadline = time.monotonic() + grace
        # Calls the transport accepted that no handler has taken yet are cancelled by
        # gRPC's stop: CANCELLED, which clients do not retry (SIGTERM at 8 closed-loop
        # clients: 1.8 a stop). First the handlers take them - each answered UNAVAILABLE by
        # the draining plane, at once - until none has come for QUIET_S with none in flight
        # (an answer sent makes its client send the next call), for at most QUIESCE_S: a
        # longer drain goes on behind the GOAWAY.
        quiet = await _quiesce(self.plane, min(QUIESCE_S, grace))
        log.info("closing the transport (GOAWAY) after %.0f ms: %s; %d requests in flight",
                 1e3 * (grace - (deadline - time.monotonic())),
                 "calls stopped coming" if quiet else "calls still coming",
                 self.plane.inflight())  # fmt: skip
        # Then the transport's shutdown, not after the drain: GOAWAY on every connection
        # and the port closed, so clients send their new calls elsewhere (a reconnect they
        # do by themselves) instead of having them refused here with UNAVAILABLE for the
        # whole drain. Calls in flight go on until they end or the grace is over (then gRPC
        # cancels them); it returns as soon as they all ended.
        closing = None if self.grpc is None else asyncio.ensure_future(self.grpc.stop(grace))
        # The REST port closes alike: its calls in flight finish within what is left of the
        # grace, idle keep-alive connections close (clients reconnect elsewhere).
        rest = None
        if self.rest is not None:
            rest = asyncio.ensure_future(self.rest.stop(max(0.0, deadline - time.monotonic())))
        while self.plane.inflight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in (closing, rest):
            if task is not None:
                await task
        # Within what is left of the grace period: an engine call that hangs (or a load that
        # takes minutes) must not hold the exit past it. What is cut short goes on while the
        # loop runs (an embedding's); at the process's exit it ends there.
        stopping = asyncio.ensure_future(self.plane.stop_models())
        try:
            await asyncio.wait_for(asyncio.shield(stopping), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            log.error("grace period over: not waiting for %s", self.plane.describe_stopping())
            self.cut_short = True
        self.plane.shared_memory.close()
        # auto-tiering's work directories removed (on their file threads; a stalled volume
        # does not hold the stop past TIERERS_STOP_S)
        try:
            await asyncio.wait_for(self.plane.tierers_stopped(), TIERERS_STOP_S)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("auto-tiering's work directories not removed within %.0f s: another "
                        "replica prunes them later", TIERERS_STOP_S)  # fmt: skip
        # the traces not yet written (log_frequency 0: all of them), waited for off the loop
        # within what is left of the grace (at least a second: the last file's write)
        self.plane.traces.close()
        writing = asyncio.get_running_loop().run_in_executor(None, self.plane.traces.wait)
        try:
            await asyncio.wait_for(writing, max(1.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            log.error("grace period over: trace files not all written (%s)", self.config.trace.file)
        if self._http is not None:  # off the loop (shutdown waits for its poll, <= 0.5 s)
            http, self._http = self._http, None
            await asyncio.get_running_loop().run_in_executor(None, http.shutdown)
            http.server_close()  # else the port stays bound after the stop
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


# The most a stop waits for the calls gRPC has accepted to reach a handler before its
# GOAWAY, and how long no call must arrive (nor any be in flight) for it to go on sooner.
QUIESCE_S = 0.25
QUIET_S = 0.02
# How often the bearer token's and the TLS certificate's files are looked at (a stat each;
# read only when one changed): a rotated Secret is in force within one or two of these.
SECRETS_POLL_S = 5.0


async def _quiesce(
    plane: DataPlane,
    limit_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """True once ``plane`` has had nothing in flight and turned no call away for
    ``QUIET_S`` (an answer sent makes its client send the next call within its round trip;
    the loop going idle was not enough: gRPC had accepted calls it had not yet handed to
    Python), False after ``limit_s``: under a flood it never goes quiet. ``clock`` (seconds)
    and ``sleep``: the test's virtual time (a loop stalled 20 ms read as quiet there)."""
    end = clock() + limit_s
    since, seen = None, None  # when the current quiet began; calls turned away until then
    while (now := clock()) < end:
        if plane.inflight() or plane.turned_away != seen:
            since, seen = now, plane.turned_away
        elif now - since >= QUIET_S:
            return True
        await sleep(0.002)
    return False


def warn_cleartext_token(config: ServerConfig) -> None:
    """Warn when clients would send the bearer token unencrypted over a network: ``auth``
    without ``tls`` on an address other machines reach. (Not an error: in Kubernetes a mesh
    sidecar or gateway often terminates TLS in front of the pod - the kubelet's gRPC probes
    speak plaintext only.)"""
    if (said := cleartext_token_warning(config)) is not None:
        log.warning("%s", said)


def cleartext_token_warning(config: ServerConfig) -> str | None:
    """``warn_cleartext_token``'s text, None where it has nothing to say (``innfer config
    check`` prints it too)."""
    if config.auth is None or config.tls is not None or loopback(config.host):
        return None
    return (
        f"auth is on without tls while listening on {config.host}: clients send the bearer "
        "token in cleartext, readable (and replayable) by anyone on the network path. Set "
        "tls (cert, key) in the server config, or terminate TLS in front of this port (a "
        "mesh or gateway) and let nothing else reach it"
    )


def _bind_problem(host: str, port: int) -> tuple[int, str]:
    """(errno, message) for a gRPC port that could not be bound: gRPC says only "Failed to
    bind", and every failure read "in use, or not permitted" - port 0 too, for a host that
    does not resolve or is no address of this machine (review 160). Told apart by resolving
    the host and binding a plain socket to it."""
    fix = "(host in the server config / --host)"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        return errno.EADDRNOTAVAIL, f"host {host!r} does not resolve ({why}) {fix}"
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return exc.errno, f"host {host!r} is no address of this machine {fix}"
            break
    return errno.EADDRINUSE, (
        f"gRPC port {port} cannot be bound on {host}: in use, or not permitted (grpc_port in "
        "the server config / --port)"
    )


HANDSHAKE_S = 20


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC server options for ``max_concurrent_streams`` (per connection: a flood on one
    leaves the others, health probes among them, untouched; see its field's doc),
    ``max_pending_calls`` (over all connections),
    ``max_connection_age_s`` and its grace, ``connection_idle_s``, the handshake's time
    limit (``HANDSHAKE_S``) and ``keepalive_s`` (none where unset).

    A gRPC client resolves DNS when it connects, and again only when a connection drops: a
    client connected before the autoscaler added pods kept calling the old ones. An aged
    connection is sent GOAWAY; the client's next call connects afresh (re-resolving), the
    calls in flight on the old one finish.

    Example:
        >>> cfg = ServerConfig.from_dict({"repository": "m", "max_connection_age_s": 60})
        >>> connection_options(cfg)[:2]
        [('grpc.max_concurrent_streams', 1024), ('grpc.max_connection_age_ms', 60000)]
        >>> connection_options(cfg)[2:4]
        [('grpc.max_connection_idle_ms', 300000), ('grpc.server_handshake_timeout_ms', 20000)]
    """
    opts = []
    if config.max_concurrent_streams is not None:
        opts.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
    if config.max_pending_calls is not None:
        # gRPC's queue of received calls the loop has not taken up: it cancels a new call
        # once this many wait (between a lower soft and the hard limit it drops at random)
        opts.append(("grpc.server.max_pending_requests", config.max_pending_calls))
        opts.append(("grpc.server.max_pending_requests_hard_limit", config.max_pending_calls))
    if config.max_connection_age_s is not None:
        opts.append(("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)))
        if config.max_connection_age_grace_s is not None:
            grace = round(config.max_connection_age_grace_s * 1000)
            opts.append(("grpc.max_connection_age_grace_ms", grace))
    if config.connection_idle_s is not None:
        opts.append(("grpc.max_connection_idle_ms", round(config.connection_idle_s * 1000)))
    # A connection's TLS and HTTP/2 handshake (milliseconds for a client) must end this soon:
    # gRPC's own 120 s let a silent connection hold its descriptor that long (helper-277).
    opts.append(("grpc.server_handshake_timeout_ms", HANDSHAKE_S * 1000))
    if config.keepalive_s is not None:
        # A dead peer is found only by a ping it does not answer; the data a stalled stream
        # has queued cannot tell (TCP's zero-window probes go on for many minutes).
        opts.append(("grpc.keepalive_time_ms", round(config.keepalive_s * 1000)))
        opts.append(("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_s * 1000)))
        # grpcio 1.85 waits for a ping's answer this long (60 s by default), whatever the
        # keepalive timeout says (seen in its http2_ping trace: "Set ping timeout timer").
        opts.append(("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout_s * 1000)))
    return opts


def probe_host(host: str) -> str:
    """Where this process reaches its own gRPC port bound on ``host``: loopback for a
    wildcard address (which is no address to connect to), else ``host`` itself.

    Example:
        >>> probe_host("0.0.0.0"), probe_host("::"), probe_host("10.0.0.7")
        ('127.0.0.1', 'localhost', '10.0.0.7')
    """
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":  # dual-stack or either alone: gRPC tries what localhost resolves to
        return "localhost"
    return grpc_host(host)


def grpc_host(host: str) -> str:
    """``host`` as a gRPC address writes it: an IPv6 literal in brackets (gRPC reads the last
    colon as the port's, so ``::1:8001`` failed to bind).

    Example:
        >>> grpc_host("::1"), grpc_host("127.0.0.1")
        ('[::1]', '127.0.0.1')
    """
    return f"[{host}]" if ":" in host else host


async def _follow(read: Callable, apply: Callable) -> None:
    """Every ``SECRETS_POLL_S``: ``read`` off the loop (a file's stat, its content when it
    changed: None, or what to put in force) and ``apply`` what it gave, on the loop. A
    failure keeps what is in force and is logged; the loop goes on."""
    while True:
        await asyncio.sleep(SECRETS_POLL_S)
        try:
            new = await in_daemon_thread(read)  # (a stalled volume must not hold the exit)
            if new is not None:
                apply(new)
        except Exception:  # (read says what it can; this is what it could not)
            log.exception("following a secret's file failed; what is in force stays")


def _said_if_died(task: asyncio.Future) -> None:
    """A follower ends only when cancelled (the stop); any other end is said."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a secret's follower died: its file is no longer followed",
                  exc_info=task.exception())  # fmt: skip


def _enable_reflection(server: grpc.aio.Server) -> None:
    names = (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    )
    if not add_reflection_service(server, names):
        log.info("grpcio-reflection not installed: server reflection disabled")


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    server = Server(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        stopping.set()
        # A start-up still loading (engine builds can take minutes) loads nothing more: the
        # model in progress finishes its step, then the server drains and stops.
        server.plane.drain()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    raise_open_files()
    await server.start()
    if not stopping.is_set():  # (else stopped while it started)
        tune_process(config, server.message_limit)
        # What loading made (engines, configs, imported modules) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it - one
        # paused the loop for ~20 ms under load, a tail every request in flight then paid.
        # (Here, not in Server.start: an embedding process's objects are not ours to freeze.)
        gc.collect()
        gc.freeze()
        await stopping.wait()
    await server.stop()
    if server.cut_short:
        # An engine thread still in its call (the grace ran out): the interpreter's exit
        # ends such a daemon thread with C++ frames on its stack - std::terminate, exit 134
        # and maybe a core dump in 3 of 8 stops (review helper-253). Stopped as asked: the
        # logs flushed, the process ends here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def tune_process(config: ServerConfig, message_limit: int) -> None:
    """The process-wide settings ``innfer serve`` applies once its models are loaded (not
    an embedding process's to change): glibc's thresholds (``tune_malloc``) and Python's
    switch interval (``gil_switch_ms``).

    Example:
        >>> tune_process(ServerConfig.from_dict({"repository": "m", "tune_malloc": False}), 0)
    """
    if config.tune_malloc:
        tune_malloc(malloc_settings(message_limit, config.limits.max_inflight_bytes))
    if config.gil_switch_ms is not None:
        sys.setswitchinterval(config.gil_switch_ms / 1000)


def raise_open_files() -> None:
    """The soft limit on open files raised to the hard one (``innfer serve`` only: a
    process-wide setting): every connection is a descriptor, and at a soft 1,024 a client
    holding idle REST connections left gRPC, REST and /metrics unable to accept one (review
    helper-256). Where the kernel refuses, the limit stays, said at DEBUG."""
    try:
        import resource
    except ImportError:  # not Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # (an unlimited hard limit the kernel caps)
        log.debug("open files: the soft limit stays at %d (%s)", soft, exc)

"""The Open Inference Protocol over HTTP/REST: KServe v2's endpoints and Triton's extensions
on them, beside the gRPC server, on the same event loop and data plane.

``curl``, ``tritonclient.http``, ``perf_analyzer`` (whose default protocol is HTTP) and
KServe's REST clients reach the same models, with the same admission, scheduling,
statistics and errors as gRPC: every call runs the gRPC service's own method body on a
message built from the body (server/rest_codec.py), so the two transports cannot drift
apart. Errors are JSON ``{"error": "..."}`` with the status ``HTTP_STATUS_OF`` gives - the
one place they map to HTTP, as ``server.service.STATUS_OF`` is for gRPC.

Routes (``{m}``: ``/v2/models/<name>`` or ``/v2/models/<name>/versions/<version>``)::

    GET  /v2                        server metadata
    GET  /v2/health/live, /ready    200, else 503 (no token needed: probes)
    GET  {m}, {m}/ready, {m}/config, {m}/stats, /v2/models/stats
    POST {m}/infer                  JSON, or JSON + binary tensors (Triton's extension)
    POST /v2/repository/index, /v2/repository/models/<name>/load, .../unload
    GET  /v2/systemsharedmemory[/region/<name>]/status; POST .../register, .../unregister
    GET  /v2/cudasharedmemory[/region/<name>]/status; POST .../unregister
    GET, POST /v2/logging

Example:
    >>> rest = RestFrontEnd(service, config)  # doctest: +SKIP
    >>> await rest.start()  # doctest: +SKIP
    >>> rest.port  # doctest: +SKIP
    8000
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_response import ContentCoding

from server import rest_codec as codec
from server.dataplane import Phase
from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EngineFailed,
    FailedPrecondition,
    InferError,
    InvalidArgument,
    ModelBroken,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TokenizerFailed,
    TooLarge,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownTier,
)
from server.limits import clip, clip_message
from server.log_settings import KINDS
from server.parameters import VERSION
from server.ports import WILDCARD_HOSTS, dual_stack_socket, port_in_use
from server.proto_gen import grpc_service_pb2 as pb
from server.service import InferenceService
from server.trace import HTTP_STAMPS, Transport, as_ns

log = logging.getLogger("innfer.rest")


class _UndecodableBody(logging.Filter):
    """Drops aiohttp's "Unhandled exception" traceback for a body that would not decode:
    after the handler's 400, aiohttp drains the rest of the body and meets the same error
    again - the client's mistake, answered already, and a traceback per call for anyone
    to flood the log with. The same for a request that is not valid HTTP (no Host header, a
    bad chunk size or Content-Length, an unknown Content-Encoding: ``HttpProcessingError``),
    which aiohttp answers 400 itself, before any route or token check: an ERROR with a
    traceback per such request, 79 kB of log for 100 requests of 32 bytes (review
    helper-227). Those are logged at DEBUG, one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # its kind only: the message quotes the raw line, an Authorization header's
            # token included (review helper-233)
            log.debug("a request that is not valid HTTP was answered 400 (%s)", type(exc).__name__)
            return False
        return not isinstance(exc, RequestPayloadError)


_UNDECODABLE = _UndecodableBody()

HTTP_STATUS_OF: dict[type[InferError], int] = {
    InvalidArgument: 400,
    FailedPrecondition: 400,
    ModelBroken: 503,  # this replica's state: another may serve it (helper-307)
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    UnknownTier: 400,  # a parameter's value, not the route (helper-307)
    AlreadyExists: 409,
    ResourceExhausted: 429,  # load: a retry later may pass (gRPC's RESOURCE_EXHAUSTED)
    TooLarge: 413,  # never fits, whatever the load: retried on a 429 for good (helper-307)
    EngineFailed: 500,
    TokenizerFailed: 500,
    Unimplemented: 501,
    Unavailable: 503,
    DeadlineExceeded: 504,
}
NOT_UNICODE = (
    "the request holds a string that is not valid Unicode (a lone UTF-16 surrogate escape "
    "such as \\ud800); send UTF-8 text"
)
OPEN_ROUTES = {"health_live", "health_ready"}  # probes need no token, as on gRPC
# Keys of a request's state: counted by its route (the middleware counts the rest), and the
# status of an answer its client left before it was written.
# (typed keys where aiohttp has them: it warns of plain strings)
_KEY = getattr(web, "RequestKey", lambda name, _kind: name)
COUNTED, GONE = _KEY("innfer_counted", bool), _KEY("innfer_gone", int)
# The application's: how a body is read (``RestFrontEnd._receive``).
RECEIVE = web.AppKey("innfer_receive", object)
# Fields a settings or repository body may have (and values a trace setting's list): its
# keys were built into a message one by one on the event loop, beyond any of gRPC's bounds
# (300,000 keys: 4.5 s, every client waiting; review helper-256).
MAX_BODY_FIELDS = 64
MAX_BODY_BYTES = 2**20  # ... and bytes (its JSON parsed on the loop)
# Seconds an idle keep-alive connection is kept (nginx's keepalive_timeout default is 75).
REST_IDLE_S = 75.0
# An upload that sends no byte for this long is answered 408 and its connection closed: a
# client that stopped mid-body held its bytes, and its connection, for good (review
# helper-249: 20 stalled 20 MiB uploads, 400 MiB, still open after 40 s).
UPLOAD_IDLE_S = 30.0
# ... and one slower than this on average (bytes/s) once UPLOAD_GRACE_S have passed.
UPLOAD_MIN_RATE = 64 * 1024
UPLOAD_GRACE_S = 10.0
# An infer request's JSON part larger than this (bytes) is parsed on a thread: ~15,000
# values, ~10 ms of Python on the loop at most (one MNIST image is ~4 KB of JSON).
JSON_INLINE_BYTES = 64 * 1024


def accepted_coding(header: str) -> ContentCoding | None:
    """The compression ``Accept-Encoding`` allows (gzip before deflate), by RFC 9110's
    q-values: ``gzip;q=0`` refuses it.

    Example:
        >>> accepted_coding("gzip;q=0, deflate"), accepted_coding("br, GZIP")
        (<ContentCoding.deflate: 'deflate'>, <ContentCoding.gzip: 'gzip'>)
    """
    allowed = set()
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            allowed.add(coding.strip().lower())
    for coding in (ContentCoding.gzip, ContentCoding.deflate):
        if coding.value in allowed:
            return coding
    return None


def http_status_of(exc: InferError) -> int:
    """The HTTP status of ``exc``'s nearest class in ``HTTP_STATUS_OF`` (500 otherwise)."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS_OF:
            return HTTP_STATUS_OF[cls]
    return 500


class _Call:
    """What the gRPC service's method bodies read of their call: the token's header, and
    trailing metadata (the tiers on ModelMetadata: REST has nowhere to put it; the same
    table is in the model's config)."""

    def __init__(self, request: web.Request) -> None:
        self._auth = request.headers.getall("Authorization", [])

    def invocation_metadata(self):
        return tuple(("authorization", value) for value in self._auth)

    def set_trailing_metadata(self, _metadata) -> None:
        pass

    def time_remaining(self) -> None:
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestFrontEnd:
    """The REST server: ``start`` listens on ``config.http_port``, ``stop`` closes the port
    and waits (up to its timeout) for the calls in flight - the data plane, draining,
    answers any new one 503."""

    def __init__(self, service: InferenceService, config, ssl_context=None) -> None:
        self.service = service
        logging.getLogger("aiohttp.server").addFilter(_UNDECODABLE)  # (once: a set)
        self.plane = service.plane
        self.config = config
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._stopping = False  # stop began: a call cancelled from here is the server's
        # Each connection's end of life (monotonic seconds), from its first answer: the
        # transport, weakly - its entry goes with the connection.
        self._expires: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._grpc = {name: getattr(InferenceService, name).__wrapped__ for name in (
            "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics",
            "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
            "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
            "CudaSharedMemoryUnregister", "LogSettings", "TraceSetting",
        )}  # fmt: skip

    def app(self, max_body: int) -> web.Application:
        """The aiohttp application: ``max_body`` bytes at most per request body."""
        app = web.Application(client_max_size=max_body, middlewares=[self._errors])
        app[RECEIVE] = self._receive
        app.on_response_prepare.append(self._close_when_draining)
        app.on_response_prepare.append(self._close_when_old)
        r = app.router
        get, post = "GET", "POST"
        routes = [
            (get, "/v2", "server_metadata", self._server_metadata),
            (get, "/v2/health/live", "health_live", self._live),
            (get, "/v2/health/ready", "health_ready", self._ready),
            (get, "/v2/models/stats", "model_stats", self._stats),
            (post, "/v2/repository/index", "repository_index", self._index),
            (post, "/v2/repository/models/{name}/load", "model_load", self._load),
            (post, "/v2/repository/models/{name}/unload", "model_unload", self._unload),
            (get, "/v2/systemsharedmemory/status", "shm_status", self._shm_status),
            (get, "/v2/systemsharedmemory/region/{region}/status", "shm_status",
             self._shm_status),
            (post, "/v2/systemsharedmemory/region/{region}/register", "shm_register",
             self._shm_register),
            (post, "/v2/systemsharedmemory/unregister", "shm_unregister", self._shm_unregister),
            (post, "/v2/systemsharedmemory/region/{region}/unregister", "shm_unregister",
             self._shm_unregister),
            (get, "/v2/cudasharedmemory/status", "cuda_shm_status", self._cuda_status),
            (get, "/v2/cudasharedmemory/region/{region}/status", "cuda_shm_status",
             self._cuda_status),
            (post, "/v2/cudasharedmemory/region/{region}/register", "cuda_shm_register",
             self._cuda_register),
            (post, "/v2/cudasharedmemory/unregister", "cuda_shm_unregister",
             self._cuda_unregister),
            (post, "/v2/cudasharedmemory/region/{region}/unregister", "cuda_shm_unregister",
             self._cuda_unregister),
            (get, "/v2/logging", "logging", self._logging),
            (post, "/v2/logging", "logging", self._logging),
            (get, "/v2/trace/setting", "trace", self._trace),
            (post, "/v2/trace/setting", "trace", self._trace),
        ]  # fmt: skip
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                (get, base, "model_metadata", self._model_metadata),
                (get, base + "/ready", "model_ready", self._model_ready),
                (get, base + "/config", "model_config", self._model_config),
                (get, base + "/stats", "model_stats", self._stats),
                (post, base + "/infer", "infer", self._infer),
                (get, base + "/trace/setting", "trace", self._trace),
                (post, base + "/trace/setting", "trace", self._trace),
            ]
        guarded = self.service.interceptors()  # (non-empty: auth is on)
        for method, path, name, handler in routes:
            if guarded and name not in OPEN_ROUTES:  # its refusals' series from 0, as gRPC's
                self.plane.metrics.auth_refused.labels(f"http:{name}")
            if method == get:  # (HEAD too, as add_get does: a probe may send it)
                r.add_get(path, self._route(name, handler))
            else:
                r.add_route(method, path, self._route(name, handler),
                            expect_handler=functools.partial(self._expect, name))  # fmt: skip
        return app

    async def start(self, message_limit: int) -> None:
        """Serve on ``http_port``: bodies up to JSON_BODY_FACTOR x ``message_limit`` (the
        gRPC message limit, sized for raw tensors)."""
        max_body = JSON_BODY_FACTOR * message_limit
        # A client that goes away cancels its call, as gRPC's does: the request leaves the
        # queue (aiohttp's default let it run and write into a closed socket).
        # auto_decompress off: bodies are decoded by ``read_body``, bounded. aiohttp's own
        # decoding also inflated a body no handler read (a 401, a 404, a health probe) while
        # draining it after the answer: a 1 MB gzip bomb cost ~2.7 s of the event loop per
        # request, before any token check (review helper-233).
        # keepalive_timeout: an idle keep-alive connection is closed after REST_IDLE_S
        # (aiohttp's default, 3,630 s, held each idle connection's descriptor an hour).
        runner = web.AppRunner(
            self.app(max_body), access_log=None, handle_signals=False,
            handler_cancellation=True, auto_decompress=False, keepalive_timeout=REST_IDLE_S,
        )  # fmt: skip
        await runner.setup()
        host, port = self.config.host, self.config.http_port
        try:
            # A wildcard host listens on IPv6 and IPv4 both, as gRPC and /metrics do: asyncio
            # bound 0.0.0.0 to IPv4 alone and "::" to IPv6 alone (review helper-251)
            sock = dual_stack_socket(port) if host in WILDCARD_HOSTS else None
            if sock is not None:
                site = web.SockSite(runner, sock, ssl_context=self.ssl_context)
            else:
                host = "0.0.0.0" if host in WILDCARD_HOSTS else host  # (no IPv6 here)
                site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context,
                                   reuse_port=False)  # fmt: skip
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            said = (
                f"HTTP port {self.config.http_port} is in use on {self.config.host} "
                "(http_port in the server config / --http-port)"
            )
            error = port_in_use(exc, said)
            if error is None:
                raise
            raise error from exc
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self, timeout_s: float) -> None:
        """Close the port and wait up to ``timeout_s`` for the calls in flight (then they
        are cancelled); idle keep-alive connections are closed."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stopping = True
            runner._shutdown_timeout = _phase_s(timeout_s)
            await runner.cleanup()

    async def _close_when_draining(self, request: web.Request, response) -> None:
        """From the drain on, every answer closes its connection (``Connection: close``): a
        keep-alive client sent its next request on the connection, the stop closed it as
        idle before that request was read, and the client got no answer - unable to tell
        whether a POST ran (review helper-241). On a new connection it gets a clean 503, or
        a refused connect: both safe to retry elsewhere."""
        if self._stopping or self.plane.phase is Phase.DRAINING:
            response.force_close()
            # (aiohttp computes the header before this hook runs: said here, or the client
            # learns of the close only when its next request fails)
            response.headers["Connection"] = "close"

    async def _close_when_old(self, request: web.Request, response) -> None:
        """An answer ``max_connection_age_s`` (+-10 % jitter, as gRPC's GOAWAY) or more after
        its connection's first answer closes it (``Connection: close``; aiohttp tells a
        handler nothing of when the connection opened): the client's next request opens a
        new one, which the Service balances onto replicas the autoscaler added. A pooled
        keep-alive connection stayed on its first pod for good - 2,834 requests over 150 s
        on one connection with the age at 60 s (review helper-285)."""
        age = self.config.max_connection_age_s
        transport = request.transport
        if age is None or transport is None:
            return
        now = time.monotonic()
        expires = self._expires.setdefault(transport, now + age * random.uniform(0.9, 1.1))
        if now >= expires:
            response.force_close()
            response.headers["Connection"] = "close"  # (see _close_when_draining)

    # -- the wrapper every route runs in ------------------------------------------------------
    def _route(self, name: str, handler: Handler) -> Handler:
        metrics = self.plane.metrics

        @functools.wraps(handler)
        async def route(request: web.Request) -> web.StreamResponse:
            t0, status = time.perf_counter(), 500
            request[COUNTED] = True  # (the middleware counts only what no route did)
            try:
                if name not in OPEN_ROUTES:
                    self.service.authenticate(_Call(request).invocation_metadata())
                    self._no_browser(request)
                _check_escapes(request)
                response = await handler(request)
                status = request.get(GONE, response.status)
                return response
            except InferError as exc:
                status = http_status_of(exc)
                headers = None
                if isinstance(exc, Unauthenticated):
                    metrics.auth_refused.labels(f"http:{name}").inc()
                    headers = {"WWW-Authenticate": "Bearer"}  # (RFC 6750, section 3)
                return _error(status, clip_message(str(exc)), headers)
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") the JSON escaped: it
                status = 400  # reached protobuf or the tokenizer, which take only Unicode
                return _error(status, NOT_UNICODE)
            except RequestPayloadError as exc:  # the body would not decode (a gzip body that
                # is not gzip, a coding aiohttp lacks): the client's, not a 500 with a traceback
                # per call (review helper-217)
                status = 400
                return _error(status, f"the request body could not be read ({exc}); send it "
                              "plain, or gzip / deflate with its Content-Encoding")  # fmt: skip
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:  # the client went away mid-call (handler
                # cancellation): nginx's "client closed request"; during a stop, 503 (the
                # grace ended - or a client left then: the two are not told apart)
                status = 503 if self._stopping else 499  # (never sent either way)
                raise
            except Exception:
                log.exception("REST %s failed", name)
                return _error(500, f"internal error in {name}; see logs")
            finally:
                metrics.http_handled(name, request.method, status, time.perf_counter() - t0)

        return route

    def _no_browser(self, request: web.Request) -> None:
        """With auth off, refuse a web page's request (``PermissionDenied``): a browser on
        this machine reaches a loopback port on behalf of any page - a cross-origin "simple"
        POST, or a DNS-rebound name's - and a page could register shared memory and have
        answers written over another program's, turn logging and traces up, or unload
        models: what a loopback host is trusted with (review helper-277). Browsers send
        ``Origin`` on every POST (the Fetch standard), so every call with side effects is
        covered; curl, tritonclient and perf_analyzer send none. With auth on a page cannot
        send the token."""
        if "Origin" in request.headers and not self.service.auth_on:
            raise PermissionDenied(
                f"a browser's request (Origin: {clip(request.headers['Origin'])}) is refused by "
                "a server without auth: call it from a client, not a web page, or turn on auth "
                "(a page cannot send the token)"
            )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own refusals (no such route, wrong method, a body over the limit) as
        the JSON errors every other answer is, saying what to do."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = (
                    f"no route {request.method} {request.path}; see the OIP REST API (/v2/...)"
                )
            elif exc.status == 405:
                allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
                message = f"{request.method} is not allowed on {request.path}; use {allowed}"
            elif exc.status == 413:
                message = self._too_large(request)
            else:
                message = exc.text or exc.reason
            if not request.get(COUNTED):  # no route ran (no such path, a wrong method)
                self.plane.metrics.http_handled("unknown" if exc.status == 404 else "refused",
                                                request.method, exc.status, 0.0)  # fmt: skip
            response = _error(exc.status, clip_message(message), headers=_allow(exc))
            if exc.status == 408:  # the rest of the body may never come: not waited for
                response.force_close()
            return response

    def _too_large(self, request: web.Request) -> str:
        """What a 413 says: the limit, and what to send instead."""
        limit = request.app._client_max_size  # (what client_max_size was made with)
        # Binary data is advice only for a JSON body: one already binary was told to send
        # what it sent (review helper-235).
        shm = "the tensors through system shared memory, " * bool(self.plane.shared_memory.enabled)
        return (
            f"the request body is over {limit / 2**20:.1f} MiB, the largest this server "
            f"takes ({JSON_BODY_FACTOR}x max_message_bytes in the server config, room for "
            "JSON's text): send fewer rows per request, "
            + (f"{shm}or raise max_message_bytes" if codec.HEADER_LENGTH in request.headers
               else "or the tensors as binary data")
        )  # fmt: skip

    async def _expect(self, name: str, request: web.Request) -> web.Response | None:
        """``Expect: 100-continue`` (curl sends it with bodies over 1 KB): "100 Continue"
        only for a body the route would read - aiohttp's default said it to a 10 GB
        Content-Length and a request without the token, which then uploaded up to the body
        limit for a 413 or a 401 (review helper-249). Those are answered at once, the
        connection closed (the body is not read)."""
        expect = request.headers.get("Expect", "")
        if request.version != HttpVersion11:
            return None
        refusal = None
        if expect.lower() != "100-continue":  # (raised, aiohttp's plain-text 417 went out:
            # this handler runs outside the middleware that writes errors as JSON)
            refusal = _error(417, f"unknown Expect: {clip_message(expect)}; send 100-continue "
                                  "or no Expect header")  # fmt: skip
        elif name not in OPEN_ROUTES:
            try:
                self.service.authenticate(_Call(request).invocation_metadata())
            except Unauthenticated as exc:
                self.plane.metrics.auth_refused.labels(f"http:{name}").inc()
                refusal = _error(401, str(exc), {"WWW-Authenticate": "Bearer"})
        length = request.content_length
        if refusal is None and length is not None and length > request.app._client_max_size:
            refusal = _error(413, clip_message(self._too_large(request)))
        if refusal is not None:
            self.plane.metrics.http_handled(name, request.method, refusal.status, 0.0)
            refusal.force_close()
            return refusal
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (the answer's own size counts from here, as aiohttp's)
        return None

    async def _receive(self, request: web.Request, limit: int) -> bytes:
        """A request's body as sent (before any Content-Encoding is undone), read as it
        arrives, each part counted against the in-flight cap (``limits.max_inflight_bytes``,
        429 once it is full) while the body is read: held whole by aiohttp, 20 uploads of 20
        MiB held 400 MiB beyond a 256 MiB cap that read 0 (review helper-249). The data
        plane holds the body again once it is decoded (``DataPlane.infer``). An upload idle
        for ``UPLOAD_IDLE_S``, or slower on average than ``UPLOAD_MIN_RATE`` after its first
        ``UPLOAD_GRACE_S``, is 408; one over ``limit`` 413 before it is read, where
        Content-Length says so. A client that goes mid-upload cancels the call."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
        cap, parts, held = self.plane.limits.max_inflight_bytes, [], 0
        if declared is not None and declared > cap:  # never fits: not "retry shortly", a
            raise self._over_cap(request, declared)  # 429 clients looped on (helper-259)
        start = time.monotonic()
        try:
            while True:
                # Idle at most UPLOAD_IDLE_S, and on average no slower than the rate floor:
                # one byte every 20 s per upload held the whole cap, gRPC's calls refused
                # with it (review helper-260).
                due = start + UPLOAD_GRACE_S + held / UPLOAD_MIN_RATE
                wait = min(UPLOAD_IDLE_S, due - time.monotonic())
                try:
                    part = await asyncio.wait_for(request.content.readany(), max(wait, 0.0))
                except asyncio.TimeoutError:  # (not the builtin's before Python 3.11)
                    raise web.HTTPRequestTimeout(
                        text=f"the request body arrives too slowly: {held:,} bytes in "
                        f"{time.monotonic() - start:.0f} s (no byte for {UPLOAD_IDLE_S:g} s, or "
                        f"under {UPLOAD_MIN_RATE // 1024} KiB/s after {UPLOAD_GRACE_S:g} s); "
                        "send the whole body, then read the answer"
                    ) from None
                except ConnectionResetError:  # the client went (aiohttp's reset is one too)
                    # mid-upload: its call is cancelled (a 500 with a traceback before)
                    request[GONE] = 499
                    raise asyncio.CancelledError("the client closed its connection") from None
                if not part:
                    return b"".join(parts)
                size = held + len(part)
                if size > limit:  # (chunked: no Content-Length to judge it by first)
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                if size > cap:  # (chunked: its size known as it comes)
                    raise self._over_cap(request, size)
                if self.plane.inflight_bytes + len(part) > cap:
                    raise self._full(request, time.monotonic() - start)
                held += self.plane.hold(len(part))
                parts.append(part)
        finally:
            self.plane.release(held)
            # (a failed read's exception holds this frame in a cycle with the request's
            # stream: the bytes went only at the collector's next full pass - review
            # helper-260; a body returned was joined before this runs)
            parts.clear()

    def _full(self, request: web.Request, seconds: float) -> ResourceExhausted:
        """The refusal of a body the in-flight cap has no room for now: load, counted for
        its model where it names one served, as ``DataPlane._admit`` counts a gRPC one (the
        refused_full series the autoscaler and alerts read missed REST's; helper-282)."""
        if request.path.endswith("/infer"):
            self.plane.count_full(request.match_info.get("name", ""), seconds)
        return self.plane._full()

    def _over_cap(self, request: web.Request, size: int) -> TooLarge:
        """A body more than the in-flight cap holds at all: counted invalid for its model
        where it names one served, as the data plane counts a gRPC request so."""
        served = self.plane.models.get(request.match_info.get("name", ""))
        if served is not None and request.path.endswith("/infer"):
            served.count_invalid()
        return self.plane.over_cap(size)

    # -- health and metadata --------------------------------------------------------------------
    async def _live(self, request: web.Request) -> web.Response:
        live = self.plane.live()
        return _json({"live": live}, 200 if live else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return await self._call("ServerMetadata", pb.ServerMetadataRequest(), request)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        return await self._call("ModelMetadata", _model(pb.ModelMetadataRequest, request), request)

    async def _model_ready(self, request: web.Request) -> web.Response:
        """200 where ready; 503 for a model that is loading, failed or wedged (another
        replica may serve it); 404, saying why, for a name or version this server does not
        serve - a 503 there had a client or a balancer retry a typo for good (review
        helper-227; KServe's server answers 404 too)."""
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = self.plane.model_ready(name, version, unknown=NotFound)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def _model_config(self, request: web.Request) -> web.Response:
        resp = await self._grpc["ModelConfig"](
            self.service, _model(pb.ModelConfigRequest, request), _Call(request)
        )
        return _json(codec.message_dict(resp.config))  # Triton's: the config itself

    async def _stats(self, request: web.Request) -> web.Response:
        message = _model(pb.ModelStatisticsRequest, request)
        resp = await self._grpc["ModelStatistics"](self.service, message, _Call(request))
        return _json(codec.message_dict(resp, codec.DURATIONS))

    # -- repository -------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        body = await _body(request, {"ready"})
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument('"ready" must be true or false')
        resp = await self._grpc["RepositoryIndex"](
            self.service, pb.RepositoryIndexRequest(ready=ready), _Call(request)
        )
        return _json([codec.message_dict(m) for m in resp.models])  # Triton's: a list

    async def _load(self, request: web.Request) -> web.Response:
        given = _repository_parameters(await _body(request, {"parameters"}))
        # refused by the RPC's body, with what to do instead
        params = {k: pb.ModelRepositoryParameter(string_param=str(v)) for k, v in given.items()}
        req = pb.RepositoryModelLoadRequest(model_name=request.match_info["name"],
                                            parameters=params)  # fmt: skip
        await self._grpc["RepositoryModelLoad"](self.service, req, _Call(request))
        return _json({})

    async def _unload(self, request: web.Request) -> web.Response:
        # read and checked as load's, though innfer has no dependents to unload (Triton's
        # unload_dependents): a body that is not JSON unloaded the model (review helper-249)
        _repository_parameters(await _body(request, {"parameters"}))
        req = pb.RepositoryModelUnloadRequest(model_name=request.match_info["name"])
        await self._grpc["RepositoryModelUnload"](self.service, req, _Call(request))
        return _json({})

    # -- Triton's shared memory, logging and trace ------------------------------------------------
    async def _shm_status(self, request: web.Request) -> web.Response:
        req = pb.SystemSharedMemoryStatusRequest(name=request.match_info.get("region", ""))
        resp = await self._grpc["SystemSharedMemoryStatus"](self.service, req, _Call(request))
        return _json([codec.message_dict(r) for r in resp.regions.values()])

    async def _shm_register(self, request: web.Request) -> web.Response:
        body = await _body(request, {"key", "offset", "byte_size"})
        if not isinstance(body.get("key", ""), str):
            raise InvalidArgument('"key" must be a string')
        for key in ("offset", "byte_size"):
            value = body.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise InvalidArgument(f'"{key}" must be a whole number of bytes in [0, 2**64)')
        req = pb.SystemSharedMemoryRegisterRequest(
            name=request.match_info["region"], key=body.get("key", ""),
            offset=body.get("offset", 0), byte_size=body.get("byte_size", 0),
        )  # fmt: skip
        await self._grpc["SystemSharedMemoryRegister"](self.service, req, _Call(request))
        return _json({})

    async def _shm_unregister(self, request: web.Request) -> web.Response:
        # The region is named in the path alone; a body was not read, so one naming a
        # region, or junk, unregistered every client's regions (review helper-275).
        if body := await _body(request):
            raise InvalidArgument(
                f"the unregister body takes no fields (got {', '.join(sorted(body))}): name "
                "the region in the path, POST /v2/systemsharedmemory/region/<name>/unregister "
                "(without one, every region is unregistered)"
            )
        req = pb.SystemSharedMemoryUnregisterRequest(name=request.match_info.get("region", ""))
        await self._grpc["SystemSharedMemoryUnregister"](self.service, req, _Call(request))
        return _json({})

    async def _cuda_status(self, request: web.Request) -> web.Response:
        req = pb.CudaSharedMemoryStatusRequest(name=request.match_info.get("region", ""))
        await self._grpc["CudaSharedMemoryStatus"](self.service, req, _Call(request))
        return _json([])

    async def _cuda_register(self, request: web.Request) -> web.Response:
        raise Unimplemented(
            "innfer does not implement CUDA shared memory: send tensors in the request "
            "body, or register system shared memory"
        )

    async def _cuda_unregister(self, request: web.Request) -> web.Response:
        return _json({})

    async def _logging(self, request: web.Request) -> web.Response:
        req = pb.LogSettingsRequest()
        if request.method == "POST":
            for key, value in (await _body(request)).items():
                # The name alone for null (as tritonclient's None over gRPC: left as it is)
                # and for a name not Triton's (the RPC says which are): null was refused
                # here, and an unknown name was told its value's type (helper-274).
                s = req.settings[key]
                if value is None or key not in KINDS:
                    continue
                if isinstance(value, bool):
                    s.bool_param = value
                elif isinstance(value, int) and 0 <= value < 2**32:
                    s.uint32_param = value
                elif isinstance(value, str):
                    s.string_param = value
                else:
                    raise InvalidArgument(
                        f"log setting {key!r} takes {_LOG_VALUE[KINDS[key]]}, got "
                        f"{clip(json.dumps(value), 40)}"
                    )
        resp = await self._grpc["LogSettings"](self.service, req, _Call(request))
        return _json({k: codec.parameter_value(v) for k, v in resp.settings.items()})

    async def _trace(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        version = request.match_info.get("version")
        if version not in (None, "", "1"):
            self.plane.model(name, version)  # a version not served: 404, as its other routes
        req = pb.TraceSettingRequest(model_name=name)
        body = (await _body(request)) if request.method == "POST" else {}
        if name and request.method == "POST" and not body:
            # Triton: a model named with no settings removes its own (the global ones again):
            # each cleared, through the RPC's checks (who may change them)
            body = {"trace_level": None, "trace_rate": None, "trace_count": None}
        for key, value in body.items():  # (a GET's: none)
            # Triton's JSON: a string, a list of strings, or null (clear a model's own)
            values = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(values, list) or len(values) > MAX_BODY_FIELDS:
                raise InvalidArgument(
                    f"trace setting {key!r}: a string, a list of at most {MAX_BODY_FIELDS} "
                    "strings, or null"
                )
            if not all(isinstance(v, str) for v in values):
                raise InvalidArgument(
                    f"trace setting {key!r}: a string, a list of strings, or null"
                )
            req.settings[key].value.extend(values)
        resp = await self._grpc["TraceSetting"](self.service, req, _Call(request))
        # Triton's answer: trace_level a list, every other setting one string
        return _json({k: list(v.value) if k == "trace_level" else v.value[0]
                      for k, v in resp.settings.items()})  # fmt: skip

    # -- inference ---------------------------------------------------------------------------------
    async def _infer(self, request: web.Request) -> web.StreamResponse:
        # The route's model first: a body for no model served is not read, inflated nor
        # parsed (a 24 KB gzip to an unknown model held the loop 9 s for its 404; review
        # helper-260)
        m = self.plane.model(request.match_info["name"], request.match_info.get("version", ""))
        reading = time.monotonic_ns()  # HTTP_RECV_START, where the request is traced
        body = await read_body(request)
        # From the whole body's arrival, as gRPC counts from its message's: the client's
        # upload is not the server's time (with plan_overhead, a slow upload spent the
        # budget before the parse began - review helper-217).
        received = time.monotonic()
        # The body counts in flight from its upload's end (read_body let the upload's bytes
        # go, with no await since) until the data plane holds it with what its values decode
        # into: parsed on a thread, a burst of large JSON bodies held several times the cap
        # that read 0 (review helper-282).
        held = self._hold_body(request, len(body), received)
        try:
            parsed = await self._parse(request, m, body, received)
        finally:
            self.plane.release(held)
        parsed.request.model_name = request.match_info["name"]
        parsed.request.model_version = request.match_info.get("version", "")
        waited = time.monotonic() - received
        # In flight: the body and what its JSON values were decoded into (both held until
        # the answer is sent; FP64 zeros "0," take 2 bytes of JSON and 8 decoded).
        size = len(body) + parsed.decoded_bytes
        transport = Transport(HTTP_STAMPS, reading, as_ns(received))
        sending = None  # HTTP_SEND_START: none where no answer is made (an error's is not timed)
        try:
            resp = await self.plane.infer(
                parsed.request, None, waited, size, parsed.raw, transport=transport
            )
            sending = time.monotonic_ns()
            response = await self._answer(request, resp, parsed)
        finally:
            self.plane.traces.sent(transport, sending)
        self.plane.answered(resp, time.monotonic() - received - waited, waited)
        return response

    async def _answer(
        self, request: web.Request, resp: pb.ModelInferResponse, parsed: codec.ParsedInfer
    ) -> web.Response:
        """Write ``resp`` as the answer to ``request`` (JSON, or binary tensors where the
        client asked for them), compressed where it accepts that."""
        data, json_length = codec.answer_body(resp, parsed)
        headers = {} if json_length is None else {codec.HEADER_LENGTH: str(json_length)}
        kind = "application/json" if json_length is None else "application/octet-stream"
        response = web.Response(body=data, content_type=kind, headers=headers)
        coding = accepted_coding(request.headers.get("Accept-Encoding", ""))
        if coding is not None:
            response.enable_compression(coding)
        # The answer's body counts in flight until it is written (a client that does not
        # read holds it in the server: 12 such clients held 60 MiB of JSON answers while
        # innfer_inflight_bytes read 0, and more were admitted; review helper-307).
        held = self.plane.hold(len(data))
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionResetError:  # the client left as its answer was written
            request[GONE] = 499
            log.debug("REST infer: the client closed its connection before its answer")
        finally:
            self.plane.release(held)
        return response

    def _hold_body(self, request: web.Request, size: int, received: float) -> int:
        """Hold a decoded body's ``size`` bytes in flight, refused as its upload would be
        (an inflated body may be larger than the bytes that came)."""
        cap = self.plane.limits.max_inflight_bytes
        if size > cap:
            raise self._over_cap(request, size)
        if self.plane.inflight_bytes + size > cap:
            raise self._full(request, time.monotonic() - received)
        return self.plane.hold(size)

    async def _parse(
        self, request: web.Request, m, body: bytes, received: float
    ) -> codec.ParsedInfer:
        """The infer body ``body`` for the model runtime ``m``, parsed."""
        header = request.headers.get(codec.HEADER_LENGTH)
        length = None
        if header is not None:
            # (int() takes " +27 " and "1_0", and refuses 5,000 digits with a ValueError)
            if not header.isascii() or not header.isdigit() or len(header) > 20:
                raise InvalidArgument(f"{codec.HEADER_LENGTH} must be a number of bytes")
            length = int(header)
        args = (body, length, self.plane.limits, self.plane.input_check(m))
        try:
            try:
                # A large JSON part is read off the loop: its values are walked one by one
                # in Python (1 M values ~0.7 s), which held every client's calls, gRPC's too.
                if (len(body) if length is None else length) > JSON_INLINE_BYTES:
                    parsed = await asyncio.to_thread(codec.parse_infer, *args)
                else:
                    parsed = codec.parse_infer(*args)
            except UnicodeEncodeError:  # (a 400 the route answered, counted nowhere: it
                raise InvalidArgument(NOT_UNICODE) from None  # is the body's: helper-307)
            # (here: a refusal of the body's naming counts as any malformed body's)
            _check_named(parsed, request.match_info["name"], request.match_info.get("version"))
            return parsed
        except InvalidArgument:  # counted as the data plane counts a malformed request
            # (gRPC's raw tensors are checked there): in the model's statistics and metrics.
            # The route first: a misspelt model with a bad body was told of the body (400)
            # where a good body got 404 (review helper-225).
            self.plane.model(request.match_info["name"], request.match_info.get("version", ""))
            self.plane.count_malformed(request.match_info["name"], time.monotonic() - received)
            raise

    async def _call(self, method: str, message, request: web.Request) -> web.Response:
        resp = await self._grpc[method](self.service, message, _Call(request))
        return _json(codec.message_dict(resp))


# REST bodies may be this many times the gRPC message limit: JSON writes an FP32 value in
# up to ~20 bytes of text against its 4 raw (an INT8 in 5 against 1), and that limit is
# sized for raw tensors - JSON requests of half a full ResNet batch were refused with 413
# (review helper-217). The in-flight cap still counts every body and what it decodes to.
JSON_BODY_FACTOR = 6


def _check_named(parsed: codec.ParsedInfer, name: str, version: str | None) -> None:
    """The body's own model_name / model_version (KServe's clients send them) name the
    route's model (``name``, ``version``: None or "" where the URL names none - the one
    version served, "1"), or the request is refused: served by the route's model, a body
    meant for another would get its answer."""
    for field, route in (("model_name", name), ("model_version", version or VERSION)):
        named = getattr(parsed, field)
        if named and named != route:
            raise InvalidArgument(
                f"the body's {field} is {clip(named)} but the URL's is {clip(route)}"
                f"{' (the version served)' if field == 'model_version' and not version else ''}"
                ": send it to the URL of the model it names, or leave the field out"
            )


def _phase_s(timeout_s: float) -> float:
    """AppRunner's shutdown_timeout for a stop that must end within ``timeout_s`` (set late:
    the grace left is known only then). aiohttp waits up to it for the calls in flight, then
    up to it again after failing their body reads, and only then cancels the handlers; it
    rounds a wait over 5 s up to the loop's next whole second, and reads 0 as no limit. So
    half of what is left, a second less above 5 s, and never 0.

    Example:
        >>> _phase_s(20.0), _phase_s(4.0), _phase_s(0.0)
        (9.0, 2.0, 0.001)
    """
    half = timeout_s / 2
    return max(half - 1.0 if half > 5.0 else half, 1e-3)


def _check_escapes(request: web.Request) -> None:
    """Refuses a path whose percent-escapes are not UTF-8: aiohttp leaves such a segment as
    sent, so ``/region/%FF/register`` registered a region named "%FF" while ``a%20b``
    named "a b" - one name, two spellings (review helper-218)."""
    for part in request.rel_url.raw_parts:
        if "%" in part:
            try:
                unquote(part, errors="strict")
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"the path segment {clip_message(part)!r} holds percent-escapes that are "
                    "not UTF-8; escape names as UTF-8 bytes (%C3%A9 for e-acute)"
                ) from None


def _model(cls, request: web.Request):
    """``cls`` (a model-level request message) for the route's model and version."""
    return cls(name=request.match_info.get("name", ""),
               version=request.match_info.get("version", ""))  # fmt: skip


# Request content codings (RFC 9110) and their zlib window bits; "deflate" is zlib-wrapped
# by the RFC, raw from some clients (told apart by the zlib header, as aiohttp did).
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_UNREADABLE = "; send it plain, or gzip / deflate with its Content-Encoding"


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The request body decoded from its Content-Encoding (gzip, deflate, or none), at most
    ``limit`` bytes (default the app's ``client_max_size``) before and after decoding (413
    beyond: a bomb is inflated only up to the limit). A coding it does not take, bytes that
    do not decode, or bytes after the compressed stream (a second gzip member, junk: the
    rest was dropped unsaid) are InvalidArgument ("could not be read")."""
    limit = request.app._client_max_size if limit is None else limit  # (client_max_size's)
    raw = await request.app[RECEIVE](request, limit)
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        return raw
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise InvalidArgument(
            f"the request body could not be read (Content-Encoding {clip_message(coding)!r} is "
            f"not taken){_UNREADABLE}"
        )
    if coding == "deflate" and not (len(raw) >= 2 and raw[0] & 0x0F == 8 and
                                    (raw[0] << 8 | raw[1]) % 31 == 0):  # fmt: skip
        wbits = -zlib.MAX_WBITS  # raw deflate, no zlib header
    inflate = zlib.decompressobj(wbits)
    try:
        data = inflate.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"the request body could not be read ({exc}){_UNREADABLE}") from None
    if len(data) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
    if not inflate.eof:
        raise InvalidArgument(f"the request body could not be read (it ends early){_UNREADABLE}")
    if inflate.unused_data:  # (review helper-260: answered as if the rest were not there)
        raise InvalidArgument(
            f"the request body could not be read ({len(inflate.unused_data):,} bytes after its "
            f"{coding} stream: one stream, one gzip member){_UNREADABLE}"
        )
    return data


_LOG_VALUE = {"bool_param": "true or false", "uint32_param": "a whole number in [0, 2**32)",
              "string_param": "a string"}  # fmt: skip


async def _body(request: web.Request, known: set[str] | None = None) -> dict:
    """A small JSON body as an object (empty: {}); with ``known``, of those fields alone: a
    misspelt one (``{"redy": true}``) was ignored and the call served as if it were absent,
    as infer's bodies are not (review helper-227). (Log settings name their own keys, which
    the RPC checks.)"""
    # (at most MAX_BODY_BYTES read and inflated: gzip took 24 MiB of spaces in first)
    data = await read_body(request, MAX_BODY_BYTES)
    if not data.strip():
        return {}
    try:
        doc = codec.loads(data)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError, UnicodeDecodeError and
        # Python's 4,300-digit integer limit are ValueErrors)
        raise InvalidArgument(f"the request body is not JSON ({codec.reason(exc)})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object")
    if len(doc) > MAX_BODY_FIELDS:  # (before any is read: 300,000 keys held the loop 4.5 s)
        raise InvalidArgument(
            f"the request body has {len(doc):,} fields; at most {MAX_BODY_FIELDS} are read"
        )
    if known is not None:
        codec.check_fields(doc, "the request body", known)
    return doc


def _repository_parameters(body: dict) -> dict:
    """A load or unload body's ``parameters``: an object, or absent ("" or [] were taken as
    none; review helper-249)."""
    given = body.get("parameters", {})
    if not isinstance(given, dict):
        raise InvalidArgument('"parameters" must be a JSON object')
    if len(given) > MAX_BODY_FIELDS:
        raise InvalidArgument(f'"parameters" has {len(given):,} fields; at most {MAX_BODY_FIELDS}')
    return given


def _json(doc, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(doc, separators=(",", ":")), status=status, content_type="application/json"
    )


def _error(status: int, message: str, headers=None) -> web.Response:
    return web.Response(
        body=json.dumps({"error": message}), status=status, content_type="application/json",
        headers=headers,
    )  # fmt: skip


def _allow(exc: web.HTTPException) -> dict | None:
    allowed = getattr(exc, "allowed_methods", None)
    return {"Allow": ", ".join(sorted(allowed))} if allowed else None

"""The server's YAML config, validated into typed classes (same idiom and errors as model.yaml).

    repository: models            # model repository root
    host: 127.0.0.1
    grpc_port: 8001
    metrics_port: 8002            # Prometheus /metrics on its own HTTP port (0: any free one)
    http_port: null               # OIP REST (HTTP/JSON, Triton's binary tensors); 8000 as
                                  # Triton's (0: any free one; null: off)
    max_message_bytes: null      # null: 2x the largest valid request (>= 4 MiB)
    grace_period_s: 20            # SIGTERM: stop admitting, finish in-flight, then exit
    stuck_restart_s: 300          # liveness fails once an engine is stuck this long (null: never)
    max_concurrent_streams: 1024  # calls open at once per client connection (null: no bound)
    max_pending_calls: null       # calls waiting in gRPC for the event loop; beyond: CANCELLED
    max_connection_age_s: 300     # GOAWAY a client connection this old: clients re-resolve
                                  # and reach replicas added since (null: never)
    max_connection_age_grace_s: null   # then cut calls still open after this (null: never)
    connection_idle_s: 300        # close a gRPC connection with no call this long
    keepalive_s: 60               # ping connections with calls open (null: gRPC's 2 h); close
    keepalive_timeout_s: 20       # one that does not answer in this long (a vanished client)
    budget_margin_ms: 1.0         # taken off each budget for the response's way back
    policy: innfer                # innfer | slackfit | fixed:<tier>
    device_slots: 1               # batches at once per device (CPU, each GPU) (0: per model)
    nvml_load: true               # GPU models: other processes' NVML utilisation slows plans
    profile_at_load: true         # re-measure each tier briefly at load (reconciles profile.json)
    plan_overhead: true           # plan budgets short by the learned request overhead
    overhead_quantile: 0.9        # ... by this quantile of it (and the metric exports it)
    tune_malloc: true             # keep large request buffers in glibc's heap (server.allocator)
    gil_switch_ms: null           # sys.setswitchinterval (null: Python's 5 ms)
    inline_max_ms: 2.0            # light load: a batch this short runs on the loop thread
    engine_nice: 5                # CPU engines' threads yield to request handling
    backend: null                 # override every model's backend preference
    tls: {cert: server.crt, key: server.key, client_ca: null}   # client_ca -> mTLS required
    auth: {bearer_token_file: token.txt}                         # health stays open
    reflection: true              # gRPC server reflection (grpcurl); open without a token
    model_control: none           # explicit: RepositoryModelLoad/Unload allowed
    limits: {max_inputs: 64, max_outputs: 64, max_inflight_bytes: 268435456}

Each field is declared once with ``runtime.configspec.spec``; ``reference(ServerConfig)``
lists them all. Relative paths are resolved against the config file's directory. Where the
repository already exists, ``policy`` and ``backend`` are checked against the models it
holds (a ``fixed:<tier>`` tier every served model has, a backend that builds each model's
precision), so a server that cannot load its models is refused when it reads its config.

Example:
    >>> cfg = ServerConfig.from_dict({"repository": "models", "grpc_port": 0})
    >>> cfg.host, cfg.metrics_port
    ('127.0.0.1', 8002)
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runtime.configspec import (
    MODEL_NAME,
    NAME,
    ConfigError,
    Where,
    parse,
    read_config_yaml,
    reference,
    spec,
    to_dict,
)
from runtime.engines import BACKENDS
from runtime.repository.config import FP16_BACKENDS, ModelConfig
from server.limits import ANSWER_FRAME_BYTES, RequestLimits
from server.overhead import QUANTILE as OVERHEAD_QUANTILE
from server.scheduling import POLICIES
from server.trace import TraceConfig

# spec() returns a dataclasses.field() carrying the rules; ruff cannot see that.
# ruff: noqa: RUF009

__all__ = [
    "AuthConfig",
    "ConfigError",
    "RequestLimits",
    "ServerConfig",
    "TLSConfig",
    "reference",
    "safe_dump",
]

# The policy that pins one tier and takes its name after a colon (make_policy's "fixed:").
_PINNED = "fixed"
_PORT = "a port number in [0, 65535] (0: pick a free port)"
MODEL_CONTROL = ("none", "explicit", "poll")


def loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: only this machine can connect.

    Example:
        >>> loopback("127.0.0.2"), loopback("::1"), loopback("0.0.0.0")
        (True, True, False)
        >>> loopback("127.attacker.example")  # a name: it resolves wherever DNS says
        False
    """
    if host.lower().rstrip(".") == "localhost":  # (LOCALHOST: helper-281)
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: not known to be this machine
        return False


def _ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _policies() -> str:
    plain = [p for p in POLICIES if p != _PINNED]
    return f"{', '.join(plain)} or {_PINNED}:<tier>"


def _policy(v: Any, where: Where) -> str:
    """A scheduling policy name from server.scheduling.POLICIES; ``fixed`` needs its tier."""
    if not isinstance(v, str):
        where.fail(v, _policies())
    name, colon, tier = v.partition(":")
    if name == _PINNED and _PINNED in POLICIES:
        if not colon or not NAME.regex.fullmatch(tier):  # ("w050\n" matched)
            where.fail(v, f"{_PINNED}:<tier> with a tier name ({NAME.description})")
    elif colon or v not in POLICIES:
        where.fail(v, _policies())
    return v


def check_cert_dates(cert: Path, now: float) -> None:
    """ValueError where the server's certificate (the chain's first) is not valid at
    ``now``: a renewal to an expired (or not yet valid) one failed every new handshake,
    where the one in force still served. Not checked where Python cannot decode it."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # (the stdlib's own PEM decoder)
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except AttributeError:  # a Python without the decoder: said, not silently skipped
        logging.getLogger("innfer.certificates").warning(
            "tls: this Python cannot decode certificates' dates; they are not checked"
        )
        return
    except (KeyError, ValueError, ssl.SSLError):
        return
    if now >= not_after:
        raise ValueError(f"{cert} expired on {decoded['notAfter']}")
    if now < not_before:
        raise ValueError(f"{cert} is not valid before {decoded['notBefore']}")


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """Serve gRPC over TLS; with ``client_ca``, clients must present a certificate too."""

    cert: Path = spec(must_exist=True, doc="server certificate chain (PEM)")
    key: Path = spec(must_exist=True, doc="the certificate's private key (PEM)")
    client_ca: Path | None = spec(
        None, must_exist=True, doc="CA that signs client certificates; set: mutual TLS"
    )

    def validate(self, where: Where) -> None:
        """Load the files as the server will (OpenSSL reads the PEM gRPC reads), so a bad one
        is refused here, naming its field: gRPC said only "Failed to bind to address" when
        the server started."""
        try:
            _tls_context().load_verify_locations(cafile=self.cert)
        except (ssl.SSLError, OSError) as exc:
            where.child("cert").fail(
                str(self.cert), f"a PEM certificate chain, the server's own first ({_why(exc)})"
            )
        try:  # (accepted at start, "ready", then every handshake failed: helper-277)
            check_cert_dates(self.cert, time.time())
        except ValueError as exc:
            where.child("cert").fail(str(self.cert), f"a certificate valid now ({exc})")
        try:
            _tls_context().load_cert_chain(self.cert, self.key, password=_no_passphrase)
        except _Encrypted:
            where.child("key").fail(
                str(self.key),
                "an unencrypted PEM private key (gRPC reads no passphrase): write one with "
                "`openssl pkey -in <key> -out <plain key>`",
            )
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None)
            if reason in _CERT_REASONS:  # the certificate's own key or signature
                where.child("cert").fail(str(self.cert), f"a usable certificate ({_why(exc)})")
            if reason == "KEY_VALUES_MISMATCH":
                expected = f"the private key of the certificate in tls.cert ({self.cert.name})"
                where.child("key").fail(str(self.key), f"{expected}; this one does not match it")
            where.child("key").fail(
                str(self.key), f"a PEM private key (none could be read; {_why(exc)})"
            )
        if self.client_ca is not None:
            try:
                _tls_context().load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                where.child("client_ca").fail(
                    str(self.client_ca),
                    f"a PEM file of the CA certificates that sign client certificates "
                    f"({_why(exc)})",
                )


# What load_cert_chain says of a certificate it parsed but will not use (OpenSSL's security
# level; the check context sets it to 0, so these are rare).
_CERT_REASONS = {"EE_KEY_TOO_SMALL", "CA_MD_TOO_WEAK", "CA_KEY_TOO_SMALL"}


class _Encrypted(Exception):
    """The private key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted  # else OpenSSL would prompt on the terminal


def _tls_context() -> ssl.SSLContext:
    """A server context for checking that the files parse and match: security level 0, as
    the policy is gRPC's (BoringSSL's) to apply, not this check's."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _why(exc: Exception) -> str:
    """What OpenSSL (or the file system) said, in one line."""
    if isinstance(exc, ssl.SSLError):
        said = exc.reason or re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc.args[-1]))
        return f"OpenSSL: {said}"
    return getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """Require ``authorization: Bearer <token>`` on every call but the health checks."""

    bearer_token_file: Path | None = spec(
        None, must_exist=True, doc="file holding the token (a mounted secret)"
    )
    bearer_token: str | None = spec(
        None, repr=False, doc="the token itself (prefer bearer_token_file)"
    )
    rotation_grace_s: float = spec(
        300.0, lo=0.0, hi=86400.0,
        doc="bearer_token_file is looked at every 5 s while the server runs: a new token "
        "there takes effect without a restart once the file has stayed unchanged for a look "
        "(5-10 s), and each one it replaced is still accepted this long while clients move "
        "to the new one (0: refused at once)",
    )  # fmt: skip

    @property
    def token(self) -> str:
        """The token: the file's content (stripped) or the literal. Read once - when the
        config is validated - and kept (not a field: repr and safe_dump never show it): the
        file was read again at every use, so a server started with whatever it held then,
        unchecked - a secret mount that read empty at start turned auth off."""
        token = self.__dict__.get("_token")
        if token is None:
            if self.bearer_token_file is not None:
                token = self.bearer_token_file.read_text().strip()
            else:
                token = self.bearer_token or ""
            object.__setattr__(self, "_token", token)  # frozen: set once, here
        return token

    def validate(self, where: Where) -> None:
        if (self.bearer_token_file is None) == (self.bearer_token is None):
            given = [k for k in ("bearer_token_file", "bearer_token") if getattr(self, k)]
            where.fail(given, "exactly one of bearer_token_file and bearer_token")
        try:
            token = self.token  # the one read; the server starts with this token
        except (OSError, UnicodeDecodeError) as exc:  # unreadable, or binary: not a token
            what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
            where.child("bearer_token_file").fail(
                str(self.bearer_token_file), f"a readable UTF-8 file holding the token ({what})"
            )
        if (problem := token_problem(token)) is not None:
            if self.bearer_token_file is not None:  # the file to fix (review helper-225)
                where.child("bearer_token_file").fail(
                    f"{self.bearer_token_file}, holding <token>", problem
                )
            where.fail("<token>", problem)


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None.

    Example:
        >>> token_problem("short"), token_problem("a-long-enough-token")
        ('a bearer token of at least 8 characters', None)
    """
    if len(token) < 8:
        return "a bearer token of at least 8 characters"
    if len(token) > 1024:  # gRPC refuses metadata past its limit: no client could send it
        return "a bearer token of at most 1,024 characters"
    # A client sends it in gRPC metadata, which carries printable ASCII only, and the
    # server strips the header's ends: any other token could never authenticate.
    if not (token.isascii() and token.isprintable()) or token != token.strip():
        return (
            "a bearer token of printable ASCII characters (what gRPC metadata carries), "
            "without leading or trailing spaces"
        )
    return None


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The server's config file.

    Example:
        >>> cfg = ServerConfig.from_dict({"repository": "models", "policy": "fixed:w050"})
        >>> cfg.policy, cfg.bearer_token
        ('fixed:w050', None)
    """

    repository: Path = spec(doc="model repository root")
    host: str = spec("127.0.0.1", expected="a host address such as 127.0.0.1", doc="listen address")
    grpc_port: int = spec(8001, lo=0, hi=65535, expected=_PORT, doc="gRPC port")
    metrics_port: int = spec(
        8002, lo=0, hi=65535, expected=_PORT,
        doc="Prometheus HTTP port, on the same host: plain HTTP without a token whatever "
        "tls and auth say (model and tier names, load, readiness): keep it private",
    )  # fmt: skip
    http_port: int | None = spec(
        None, lo=0, hi=65535, expected=_PORT,  # (", or null": added for optional fields)
        doc="OIP REST port (KServe v2 HTTP/JSON with Triton's binary tensor extension: curl, "
        "tritonclient.http, perf_analyzer's default), on the same host, with the same tls and "
        "auth as gRPC; null: off",
    )  # fmt: skip
    max_message_bytes: int | None = spec(
        # at least twice what an answer's frame may take besides its tensors (the data
        # plane's reserve): below it every answer was refused, "0.0 MiB above 0.0 MiB"
        None, lo=2 * ANSWER_FRAME_BYTES, hi=2**31 - 1,
        doc="largest gRPC message, either way; null: twice the largest valid request of the "
        "models found at start-up (at least 4 MiB), so oversized requests are refused by gRPC "
        "before they are buffered; REST bodies may be 6x this (JSON's text)",
    )  # fmt: skip
    grace_period_s: float = spec(
        20.0, lo=0, hi=3600, unit="seconds", doc="SIGTERM: time to finish in-flight requests"
    )
    stuck_restart_s: float | None = spec(
        300.0, lo=0, hi=86400, unit="seconds",
        doc="liveness (the health service's \"\" and \"liveness\", ServerLive) fails once an "
        "engine has been stuck in a batch this long after readiness failed for it (a batch "
        "running 100x its plan and at least 30 s): a hung engine call cannot be interrupted, "
        "its slot is lost until the process exits, and the pod, out of its Service, serves "
        "nothing - the kubelet's restart is the cure. null: never (readiness only)",
    )  # fmt: skip
    max_concurrent_streams: int | None = spec(
        1024, lo=1, hi=2**31 - 1,
        doc="calls open at once on one client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_"
        "STREAMS; a ModelStreamInfer stream is one call for its whole life). Beyond it gRPC "
        "resets a call before it is read: Python/C++ clients see UNAVAILABLE 'Stream removed "
        "(RST_STREAM ... error code 7)' - never processed, safe to retry, and not in innfer's "
        "metrics (it never reaches the server's code); grpc-go/java clients queue it instead "
        "(by their source; untested here). "
        "Every call gRPC hands over is held until answered, so without a bound a client "
        "sending 4x what the server answers grew it by its backlog (bench/results/"
        "stream_bound.json). A C-core client process shares one connection among its "
        "clients: one that needs more in flight passes channel_args="
        "[('grpc.use_local_subchannel_pool', 1)] for a connection of its own; null: no bound "
        "(gRPC's and Triton's default; beyond ~1,000 waiting calls gRPC then drops new ones "
        "as CANCELLED)",
    )  # fmt: skip
    max_pending_calls: int | None = spec(
        None, lo=1, hi=2**31 - 1,
        doc="calls gRPC has received that the server's event loop has not yet taken up, over "
        "all connections (gRPC's pending queue; the loop takes about one per turn). A call "
        "waits there before any innfer code sees it, its budget running while no scheduler "
        "can plan, refuse or shrink it: where request handling alone fills the CPU (a small "
        "model sent more calls per second than the process parses) the backlog builds "
        "there, not in the scheduler's queue, and answers come late (the wait: "
        "innfer_pending_wait_seconds). Beyond this many gRPC cancels a new call at once, "
        "before it is read - the client sees CANCELLED ('CANCELLED'), never processed, safe "
        "to retry on another replica, counted by no innfer metric (the share of the server's "
        "own probes cancelled, innfer_pending_probes_total, follows it under steady load, "
        "not in bursts) - also in a burst on an idle server. bench/results/pending_bound."
        "json (an MLP alone on one core, "
        "~1,400 calls/s handled, budgets U(20, 100) ms): within budget at 1,500 / 2,250 "
        "calls/s null 57-72 / 0.2-0.4 % (1,500/s is bistable: 0.7 % in another run), 64 "
        "61-83 / 15-27 %, 16 94 / 56 %; of 128 calls sent at once on the idle server "
        "none / 57 / ~100 cancelled (16: 9-13 of 32). Health checks (grpc.health.v1 Check, "
        "the Kubernetes probes) have a queue of their own, bounded alike: inference calls "
        "neither hold nor cancel them. null (the "
        "default): gRPC's own, 1,000 waiting, then cancelled at random up to 3,000 - no "
        "burst a client sends is cut, and overload beyond what the process handles makes "
        "every answer late",
    )  # fmt: skip
    max_connection_age_s: float | None = spec(
        300.0, lo=1, hi=86_400, unit="seconds",
        doc="a client connection this old is sent GOAWAY (gRPC adds +-10 % jitter; a REST "
        "connection's first answer after this long from its first answer closes it, "
        "Connection: close): its calls go on, new ones "
        "go over a new connection, which re-resolves DNS and so reaches replicas the "
        "autoscaler added since (without it a connected client stays on the pods it first "
        "reached); null: connections live until the client closes them",
    )  # fmt: skip
    connection_idle_s: float | None = spec(
        300.0, lo=1, hi=86_400, unit="seconds",
        doc="a gRPC connection with no call for this long is closed (GOAWAY: a client's next "
        "call connects again); a connection that never sends a call - one that never sends "
        "anything - is closed then too, where it was held for good, a descriptor each (one "
        "client's thousands locked every other client out, health probes included: review "
        "helper-277); null: idle connections stay",
    )  # fmt: skip
    max_connection_age_grace_s: float | None = spec(
        None, lo=0, hi=86_400, unit="seconds",
        doc="after that GOAWAY, calls still open on the old connection (a long-lived "
        "ModelStreamInfer stream) are cut after this long and the connection closed; null: "
        "never cut (a stream stays on its replica until the client ends it)",
    )  # fmt: skip
    keepalive_s: float | None = spec(
        60.0, lo=1, hi=86_400, unit="seconds",
        doc="ping each client connection that has calls open this often (HTTP/2 PING) and "
        "close it when no answer comes within keepalive_timeout_s: its calls are cancelled "
        "and what they hold of limits.max_inflight_bytes - requests, a stream's unread "
        "answers - is let go. A client that vanished without closing (its node lost, a "
        "network partition, a stopped process) otherwise kept them for hours; a live "
        "client's gRPC answers pings even while its application reads nothing. null: gRPC's "
        "server default (the first ping after 2 hours)",
    )  # fmt: skip
    keepalive_timeout_s: float = spec(
        20.0, lo=1, hi=3600, unit="seconds",
        doc="how long a keepalive ping waits for its answer before the connection is closed",
    )  # fmt: skip
    budget_margin_ms: float = spec(
        1.0, lo=0, hi=10_000, hi_open=True, unit="milliseconds",
        doc="taken off every latency budget for the response's way back",
    )  # fmt: skip
    policy: str = spec(
        "innfer", parse=_policy, expected=_policies(), doc="scheduling policy for every model"
    )
    backend: str | None = spec(
        None, choices=BACKENDS, doc="override every model's backend preference"
    )
    device_slots: int = spec(
        1, lo=0, hi=1024,
        doc="batches that may run at once on each device - the CPU, each GPU - that its models "
        "share (one arbiter per device: deadline order across its models, each planning "
        "behind the others' work); 0: every model gets its own slot and ignores the others",
    )  # fmt: skip
    nvml_load: bool = spec(
        True,
        doc="where a model runs on an NVIDIA GPU and pynvml imports (the gpu extra): sample "
        "the GPU's utilisation by other processes every 0.5 s and plan that much slower at "
        "once (server/gpu_load.py); no effect on a CPU-only server",
    )  # fmt: skip
    plan_overhead: bool = spec(
        True,
        doc="count each budget from when its request began to be parsed and plan it short by "
        "the learned request overhead (innfer_request_overhead_seconds, overhead_quantile); "
        "admission still refuses only what misses at the overhead's median (or a quiet "
        "server's, innfer_request_overhead_quiet_seconds, where lower). Off: budgets "
        "planned from the scheduler's stamp with budget_margin_ms alone - the answers' way "
        "out (the hop back from the engine, encoding, sending: 2-4 ms each on a shared core) "
        "is then not planned for (the ResNet at 8 clients and 30 ms: 97.0-99.4 % within "
        "budget off, 98.8-99.9 % on; see docs/design.md)",
    )
    engine_nice: int = spec(
        5, lo=0, hi=19,
        doc="added to the nice value of the threads that call the engines of models computing "
        "on the CPU (ONNX Runtime, torch on CPU): where they share cores with request "
        "handling, the event loop first takes in what arrived and each batch holds all of it "
        "(the MLP on one core at 8 clients: 1.32-1.37x the requests/s); 0: the same priority. "
        "ONNX Runtime's pool threads (threads >= 2) start at the same value. Linux only; GPU "
        "engines' threads keep theirs (server/engine_threads.py)",
    )  # fmt: skip
    inline_max_ms: float = spec(
        2.0, lo=0, hi=1000, unit="milliseconds",
        doc="a batch planned at most this long runs on the event loop thread when nothing else "
        "is in flight on the device (no hand-off to an engine thread and back); 0: always on "
        "an engine thread. ONNX Runtime engines on a shared device (device_slots >= 1) only. "
        "An engine call that hangs inline holds the loop: no call, probe or signal is "
        "answered until the kubelet's liveness timeout restarts the container (whatever "
        "stuck_restart_s says); 0 keeps them answered",
    )  # fmt: skip
    gil_switch_ms: float | None = spec(
        None, lo=0.1, hi=100, unit="milliseconds",
        doc="innfer serve: how long a thread may hold Python's GIL while another waits for it "
        "(sys.setswitchinterval; null: Python's 5 ms). An engine thread woken with a batch, "
        "or back from the engine with its outputs, waits up to this long while the event "
        "loop handles requests. At the issue-18 point (ResNet, 8 clients, 30 ms, one core) "
        "0.5 ms took less server CPU per request in 7 of 7 paired runs (2.56 vs 2.96 ms "
        "mean), within-budget shares in the noise of a slow hour "
        "(bench/results/gil_switch_session69): not the default until that shows",
    )  # fmt: skip
    tune_malloc: bool = spec(
        True,
        doc="innfer serve: raise glibc's mmap and trim thresholds to the message limit and "
        "the in-flight cap, so request buffers are reused rather than mapped and faulted in "
        "afresh (an echo server: half the CPU per 600 KB request; see server/allocator.py)",
    )
    overhead_quantile: float = spec(
        OVERHEAD_QUANTILE, lo=0.5, hi=0.999,
        doc="the quantile of the learned request overhead that plan_overhead plans every "
        "budget short by, and innfer_request_overhead_seconds exports",
    )  # fmt: skip
    profile_at_load: bool = spec(
        True,
        doc="re-measure each tier briefly when a model loads and start the latency "
        "correction from it (a profile measured on a busy or another machine is reconciled); "
        "off, each tier still runs once at batch 1 and once at max_batch",
    )
    engine_cache_spare: Path | None = spec(
        None,
        doc="a writable folder where the engines a model's engines/ cache lacks are built "
        "when the repository cannot be written (a read-only mount: KServe's /mnt/models, a "
        "read-only PVC; an image with the models baked in): without it such a model fails "
        "to load on a node whose device or backend version the cache was not built for. "
        "One folder per model in it; on an emptyDir each pod builds what it misses",
    )
    system_shared_memory: bool | None = spec(
        None,
        doc="serve Triton's system shared-memory extension: a client on this host registers "
        "a region of a /dev/shm object (SystemSharedMemoryRegister) and passes tensors "
        "through it instead of the message (tritonclient's set_shared_memory, perf_analyzer "
        "--shared-memory system). The server reads and writes any /dev/shm object a client "
        "names. null (the default): on where only this host's clients reach the port "
        "(a loopback host) or a token is required (auth), else off; true is refused on "
        "another host without auth; false where other processes keep shared memory there. "
        "The Kubernetes deploy sets false (a client in another pod cannot share memory)",
    )
    reflection: bool = spec(
        True,
        doc="serve gRPC server reflection: any client, without a token, may list the "
        "services and their message types (what grpcurl, Postman and evans use). The schema "
        "is the public Open Inference Protocol; false tells clients that are not yours "
        "nothing about the port. The Kubernetes deploy sets false",
    )
    tls: TLSConfig | None = spec(None, doc="serve over TLS (default: plaintext)")
    auth: AuthConfig | None = spec(None, doc="require a bearer token (health stays open)")
    models: tuple[str, ...] = spec(
        (), pattern=MODEL_NAME, unique=True,
        doc="models to load; empty: every one in the repository",
    )  # fmt: skip
    model_control: str = spec(
        "none", choices=MODEL_CONTROL,
        doc="explicit: clients may load and unload models (RepositoryModelLoad/Unload); "
        "poll: the repository is looked at every repository_poll_s and a changed or new "
        "model is loaded (a folder that goes is served on); none: the models are fixed at "
        "start-up (Triton's --model-control-mode)",
    )  # fmt: skip
    repository_poll_s: float = spec(
        15.0, lo=0.2, hi=86400.0,
        doc="model_control: poll - how often the repository is looked at (a few file "
        "stats per model, off the serving loop)",
    )  # fmt: skip
    limits: RequestLimits = spec(
        RequestLimits(), doc="per-request limits and the cap on request bytes in flight"
    )
    trace: TraceConfig = spec(
        TraceConfig(),
        doc="request traces in Triton's trace format (server/trace.py): the file, and the "
        "settings at start that clients may change (TraceSetting)",
    )
    source: str = spec("<config>", key=False, compare=False, doc="the file this was read from")

    @property
    def shared_memory_on(self) -> bool:
        """Whether system shared memory is served (``system_shared_memory``; null: where
        only this host's clients, or clients with the token, reach the port)."""
        if self.system_shared_memory is not None:
            return self.system_shared_memory
        return self.auth is not None or loopback(self.host)

    @property
    def bearer_token(self) -> str | None:
        """The token clients must send, or None when auth is off."""
        return None if self.auth is None else self.auth.token

    def validate(self, where: Where) -> None:
        """Checks across fields (and, where it exists, against the repository's models)."""
        if self.model_control == "explicit" and self.auth is None and not loopback(self.host):
            # Anyone reaching the port could load, reload and unload models.
            where.child("model_control").fail(
                self.model_control,
                f"none, or auth (a bearer token) when listening on {self.host}: explicit "
                "model control lets any client that reaches the port unload models",
            )
        if self.system_shared_memory and self.auth is None and not loopback(self.host):
            # Anyone reaching the port could read and overwrite this host's /dev/shm objects
            # (another program's, through a model's outputs), and a client elsewhere shares
            # no memory with the server anyway (review 204).
            where.child("system_shared_memory").fail(
                self.system_shared_memory,
                f"false or null, or auth (a bearer token) when listening on {self.host}: any "
                "client that reaches the port could read and write this host's /dev/shm",
            )
        if ":" in self.host and not _ipv6(self.host):
            # "localhost:9000" or "[::1]": gRPC would bind "<host>:<grpc_port>" and fail, or
            # Prometheus's server would not resolve it.
            where.child("host").fail(
                self.host,
                "a host name or IP address without a port (the ports are grpc_port and "
                "metrics_port); an IPv6 address without brackets, e.g. ::1",
            )
        if self.max_connection_age_grace_s is not None and self.max_connection_age_s is None:
            where.child("max_connection_age_grace_s").fail(
                self.max_connection_age_grace_s,
                "null, or set max_connection_age_s too: the grace counts from an aged "
                "connection's GOAWAY, which max_connection_age_s: null never sends",
            )
        if self.trace.level != "OFF" and self.trace.file is None:
            where.child("trace").child("file").fail(
                None, "a file path: trace.level TIMESTAMPS writes the traces there"
            )
        if self.metrics_port and self.metrics_port == self.grpc_port:
            where.child("metrics_port").fail(
                self.metrics_port, f"a port other than grpc_port ({self.grpc_port})"
            )
        if self.http_port and self.http_port in (self.grpc_port, self.metrics_port):
            where.child("http_port").fail(
                self.http_port,
                f"a port other than grpc_port ({self.grpc_port}) and metrics_port "
                f"({self.metrics_port})",
            )
        pinned = self.policy.partition(":")[2] if self.policy.startswith(_PINNED + ":") else None
        if pinned is None and not self.backend:
            return  # nothing below depends on the models
        for name, model in self._known_models():
            if pinned is not None and model.auto_tiers is not None:
                # auto-tiering replaces the tier set (the choice may drop the pinned tier):
                # every swap failed after its build, and a restart did not load the model
                where.child("policy").fail(
                    self.policy,
                    f"innfer or slackfit: model {name!r} ({model.source}) has auto_tiers, which "
                    f"choose its tiers - pin a tier per request (parameter tier) instead, or "
                    f"remove auto_tiers",
                )
            elif pinned is not None and pinned not in {t.name for t in model.tiers}:
                where.child("policy").fail(
                    self.policy,
                    f"{_PINNED}:<tier> naming a tier every served model has; model {name!r} "
                    f"({model.source}) has {', '.join(t.name for t in model.tiers)}",
                )
            # A backend the model lists is its own fp32 fallback (model.yaml: "fp32 on a
            # listed fallback"): forcing it builds fp32, as reaching it by itself does
            # (review helper-243: a GPU node whose TensorRT builds fail could not be pinned
            # to ONNX Runtime). One the model does not list is a mistake.
            fp16_only = self.backend not in FP16_BACKENDS and self.backend not in model.backends
            if self.backend and model.precision == "fp16" and fp16_only:
                where.child("backend").fail(
                    self.backend,
                    f"one of {', '.join(FP16_BACKENDS)}, a backend the model lists, or null: "
                    f"model {name!r} ({model.source}) has precision fp16, which "
                    f"{self.backend} cannot build, and does not list {self.backend} as its "
                    f"fp32 fallback (backends: {list(model.backends)})",
                )

    def _known_models(self) -> list[tuple[str, ModelConfig]]:
        """The served models whose model.yaml exists and is valid now (others are refused
        with their own error when loaded; a repository may be filled after this is read)."""
        if not self.repository.is_dir():
            return []
        names = self.models or sorted(p.name for p in self.repository.iterdir())
        found = []
        for name in names:
            path = self.repository / name / "model.yaml"
            # A folder this process may not read is no config error: its load says why (it
            # stopped the server's start, review helper-147).
            try:
                if path.is_file():
                    found.append((name, ModelConfig.load(path)))
            except (ConfigError, OSError):
                continue
        return found

    @classmethod
    def load(cls, path: str | Path, repository: str | Path | None = None) -> ServerConfig:
        """Read and validate ``path``; relative paths in it are relative to its directory.
        ``repository`` (``innfer serve --repository``) replaces the file's, or stands in for
        it where the file names none (a file of tuning only); it is relative to the working
        directory."""
        path = Path(path)
        data = read_config_yaml(path, _GUARDS) or {}
        if repository is not None and isinstance(data, dict):
            # absolute, links not followed: resolved here, a symlinked release
            # (current -> releases/v2, a ConfigMap's ..data) swapped while serving was never
            # seen, the old one served on (review helper-293) - as the file's is read
            data = {**data, "repository": str(Path(repository).absolute())}
        return cls.from_dict(data, source=str(path), base=path.parent)

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "<config>", base: Path | None = None
    ) -> ServerConfig:
        """Validate a mapping (parsed YAML); ``source`` names it in errors, ``base`` is the
        directory relative paths start from (default: the working directory)."""
        return parse(cls, data, Where(source, base=base), source=source)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` (e.g. command-line overrides), validated like the file.

        Example:
            >>> ServerConfig.from_dict({"repository": "m"}).replace(grpc_port=0).grpc_port
            0
        """
        data = to_dict(self) | {k: _plain(v) for k, v in changes.items()}
        return type(self).from_dict(data, source=self.source)


# Sections whose absence turns a protection off: written with nothing under them (every key
# commented out), YAML reads them as null - and the server started in plaintext, without
# authentication, saying nothing (review 160).
_GUARDS = {"auth": "authentication", "tls": "TLS"}


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


def safe_dump(cfg: ServerConfig) -> str:
    """The config as YAML with the token masked (for logs)."""
    data = to_dict(cfg)
    if data.get("auth") and data["auth"].get("bearer_token"):
        data["auth"]["bearer_token"] = "***"
    return yaml.safe_dump(data, sort_keys=False)

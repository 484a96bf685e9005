"""The request parameters a client sends (OIP's ``parameters`` map, Triton's ``priority``
and ``timeout`` among them), read and checked: the budget and where it came from, a tier pin,
a priority level, the request id's size, the model version; a misspelt name refused.

Pure functions on protobuf ``InferParameter`` maps: no model, no transport. Each raises the
``server.errors`` exception a bad value deserves (INVALID_ARGUMENT, NOT_FOUND), with what to
send instead.

Example:
    >>> from server.proto_gen import grpc_service_pb2 as pb
    >>> params = {"latency_budget_ms": pb.InferParameter(int64_param=20)}
    >>> budget(params, time_remaining=None, default_ms=100.0)
    (0.02, 'latency_budget_ms')
"""

from __future__ import annotations

import difflib
import math

from runtime.repository.config import MAX_BUDGET_MS
from server.errors import InvalidArgument, NotFound
from server.limits import clip

VERSION = "1"  # innfer serves one version per model: the INN


def number(param, name: str) -> float | None:
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param", "double_param"):
        return float(getattr(param, kind))
    # in plain words, not the protobuf field's: REST clients sent "20" and read "got a
    # string_param" (review helper-235)
    if kind == "string_param":
        got = f"the string {clip(param.string_param)}"
    elif kind == "bool_param":
        got = str(param.bool_param).lower()
    else:
        got = "no value"
    raise InvalidArgument(f"parameter {name!r} must be a number, got {got}")


def id_size(request_id: str, limit: int) -> int | None:
    """A request's id in UTF-8 bytes (an answer echoes it whole), or None above ``limit``.

    Example:
        >>> id_size("req-1", 16), id_size("é" * 9, 16)
        (5, None)
    """
    if len(request_id) > limit:  # characters: never more than the bytes; no copy of it
        return None
    size = len(request_id.encode())
    return size if size <= limit else None


def id_bytes(request_id: str, limit: int) -> int:
    """Bytes of a request's id (its answer echoes it); INVALID_ARGUMENT above ``limit``."""
    size = id_size(request_id, limit)
    if size is None:
        # In bytes as the limit counts them: 600 "é" said "600 characters" against 1024
        # bytes, which read as within it (review 194).
        raise InvalidArgument(
            f"the request id is {len(request_id.encode()):,} bytes in UTF-8 "
            f"({len(request_id):,} characters); at most {limit} (limits.max_id_bytes): "
            "send a shorter id"
        )
    return size


# Where a request's budget came from (``budget``'s second answer) -> what raises it, for
# a refusal: "send a larger latency_budget_ms" alone misled a client whose budget was its
# timeout, its deadline or the model's default (review 190).
BUDGET_SOURCES = {
    "latency_budget_ms": "",
    "timeout": "the budget was Triton's timeout parameter, which cuts the request's budget: "
    "raise the timeout",
    "deadline": "the budget was what the call's gRPC deadline (client_timeout) had left when "
    "the server read it, which cuts the request's budget: raise the deadline (a busy server "
    "takes longer to read a call), or send latency_budget_ms",
    "default": "the budget was the model's default_latency_budget_ms (no latency_budget_ms "
    "nor deadline was sent): send latency_budget_ms, or raise the default in model.yaml",
    # On a stream the deadline is the whole stream's (only a cap; review 193):
    "stream deadline": "the budget was what the stream's deadline (stream_timeout) had left, "
    "which cuts the request's budget: open the stream with a longer one",
    "stream default": "the budget was the model's default_latency_budget_ms (no "
    "latency_budget_ms was sent; a stream's deadline only caps it): send latency_budget_ms, "
    "or raise the default in model.yaml",
    # Both caps below the budget: naming the lower alone sent a client back a second time
    "deadline and timeout": "the budget was the lower of the call's gRPC deadline "
    "(client_timeout) and Triton's timeout parameter, which both cut the request's budget: "
    "raise both",
    "stream deadline and timeout": "the budget was the lower of what the stream's deadline "
    "(stream_timeout) had left and Triton's timeout parameter, which both cut the request's "
    "budget: raise the timeout and open the stream with a longer deadline",
}


# A cancel this close to a deadline is the deadline passing (the client's timer fires a
# transit before the server's), not its client's choice: this share of the time the call
# had, at least CANCEL_FLOOR_S, at most CANCEL_CAP_S (a 0.4 s stream's deadline was counted
# Canceled on a loaded CI run with 2 %). One rule for the gRPC code a call is counted with
# and the outcome its request is (a 45 ms deadline cancelled with 40 ms left was
# DeadlineExceeded in one, cancelled in the other: review helper-297).
CANCEL_SHARE = 0.125
CANCEL_FLOOR_S = 0.005
CANCEL_CAP_S = 0.05


def cancel_at_deadline(left_s: float, had_s: float) -> bool:
    """Whether a cancel with ``left_s`` of the ``had_s`` seconds a call or request had to
    its deadline is that deadline passing.

    Example:
        >>> cancel_at_deadline(0.040, 0.045), cancel_at_deadline(0.003, 0.045)
        (False, True)
        >>> cancel_at_deadline(0.045, 0.4)  # within 50 ms: an eighth of the call's 0.4 s
        True
    """
    return left_s <= min(CANCEL_CAP_S, max(CANCEL_FLOOR_S, CANCEL_SHARE * had_s))


def budget(
    params, time_remaining: float | None, default_ms: float, deadline_is_budget: bool = True
) -> tuple[float, str]:
    """(seconds, where they came from: a ``BUDGET_SOURCES`` key): ``latency_budget_ms``
    parameter, else the gRPC deadline (where it is the request's own:
    ``deadline_is_budget``), else the default. Triton's ``timeout`` (microseconds) and the
    deadline cap it: past them the request is not worth serving."""
    budget, source = None, "latency_budget_ms"
    if "latency_budget_ms" in params:
        ms = number(params["latency_budget_ms"], "latency_budget_ms")
        if not math.isfinite(ms) or ms <= 0:
            raise InvalidArgument(f"latency_budget_ms must be a positive number, got {ms}")
        if ms > MAX_BUDGET_MS:  # the answer reports it in int64 microseconds
            raise InvalidArgument(  # (:g wrote 1000000000.5 as "1e+09 is above 1e+09")
                f"latency_budget_ms {ms!r} is above {MAX_BUDGET_MS:,.0f} (11.6 days); leave "
                "it out to use the model's default budget"
            )
        budget = ms / 1e3
    elif time_remaining is not None and deadline_is_budget:
        budget, source = time_remaining, "deadline"
    if budget is None:
        budget, source = default_ms / 1e3, "default"
    caps = {}  # what cuts that budget: Triton's timeout, and the deadline (never answer
    # after the client gave up); both named where both cut it, whichever is lower
    if "timeout" in params:
        us = number(params["timeout"], "timeout")
        if not math.isfinite(us) or us < 0:
            raise InvalidArgument(f"timeout must be a non-negative number of us, got {us}")
        if 0 < us / 1e6 < budget:  # Triton: 0 means no timeout
            caps["timeout"] = us / 1e6
    if time_remaining is not None and time_remaining < budget:
        caps["deadline"] = time_remaining
    if caps:
        budget = min(caps.values())
        source = "deadline and timeout" if len(caps) == 2 else next(iter(caps))
    if not deadline_is_budget and source.startswith(("deadline", "default")):
        source = f"stream {source}"
    return budget, source


# The request parameters innfer reads (Triton's `priority` and `timeout` among them), and
# those other OIP clients and Triton send that innfer leaves alone: an unknown name close to
# one of innfer's is refused as a likely misspelling; any other is ignored, as OIP lets
# servers ignore the extensions they do not know.
REQUEST_PARAMETERS = ("latency_budget_ms", "tier", "min_tier", "priority", "timeout", "truncate")
_PASSED_OVER = frozenset({
    "sequence_id", "sequence_start", "sequence_end", "binary_data_output", "headers",
    "triton_enable_empty_final_response",
})  # fmt: skip
_READ = frozenset(REQUEST_PARAMETERS)
# Names other servers use for a budget (what a user moving to innfer may send).
_BUDGET_ALIASES = frozenset({"budget_ms", "deadline_ms", "latency_ms", "slo_ms", "budget"})
_UNITS = ("latency_budget_ms (ms), tier and min_tier (tier names), priority (Triton's: 1 is "
          "the highest), timeout (Triton's: microseconds), truncate (bool)")  # fmt: skip


# Parameter names longer than this are not checked for misspellings: difflib's 0.75
# cutoff needs a name within 5/3 of a known one's length (and it costs the square of it).
_GUESS_MAX_CHARS = 2 * max(map(len, REQUEST_PARAMETERS))


def check_parameter_names(params) -> None:
    """InvalidArgument for a parameter name that looks like a misspelt one of innfer's
    (``tierr``, ``Latency-Budget-Ms``, ``truncation``): ignored, it would serve the request
    without the pin, budget or truncation its sender asked for, and say nothing.

    Example:
        >>> check_parameter_names({"tier": 1, "x-request-source": 1})   # unknown: ignored
        >>> try:
        ...     check_parameter_names({"latency_budget": 1})
        ... except InvalidArgument as exc:
        ...     print(str(exc).split("?")[0])
        unknown request parameter 'latency_budget': did you mean 'latency_budget_ms'
    """
    for key in params:
        if key in _READ or key in _PASSED_OVER:
            continue
        if len(key) > _GUESS_MAX_CHARS:  # no misspelling of ours, and difflib is quadratic
            continue  # (a 3.5 MB key held the event loop 0.45 s per request)
        name = key.casefold().replace("-", "_")
        if name in ("timeout_ms", "timeout_us"):  # which unit was meant is not ours to guess
            raise InvalidArgument(
                f"unknown request parameter {clip(key)}: a budget in milliseconds is "
                f"'latency_budget_ms'; Triton's 'timeout' is in microseconds. innfer reads "
                f"{_UNITS}"
            )
        near = ["latency_budget_ms"] if name in _BUDGET_ALIASES else [
            n for n in difflib.get_close_matches(name, REQUEST_PARAMETERS, n=3, cutoff=0.75)
            # four letters leave room for other words at 0.75 ('time', 'tire'): one edit
            if n != "tier" or _one_edit(name, n)
        ]  # fmt: skip
        if near:
            raise InvalidArgument(
                f"unknown request parameter {clip(key)}: did you mean {near[0]!r}? innfer "
                f"reads {_UNITS}"
            )


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by at most one insertion, deletion or substitution.

    Example:
        >>> _one_edit("tierr", "tier"), _one_edit("tiar", "tier"), _one_edit("time", "tier")
        (True, True, False)
    """
    if abs(len(a) - len(b)) > 1:
        return False
    pairs = zip(a, b, strict=False)  # (the shorter one ends the pairs)
    i = next((k for k, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))
    return a[i + 1 :] == b[i + 1 :] or a[i:] == b[i + 1 :] or a[i + 1 :] == b[i:]


def bool_param(params, name: str, default: bool) -> bool:
    if name not in params:
        return default
    p = params[name]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter {name!r} must be a bool (true or false)")
    return p.bool_param


def string_param(params, name: str) -> str | None:
    if name not in params:
        return None
    p = params[name]
    if p.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"parameter {name!r} must be a string (a tier name)")
    if len(p.string_param) > 255:
        raise InvalidArgument(f"parameter {name!r} is not a tier name: {clip(p.string_param)}")
    return p.string_param


def check_version(name: str, version: str) -> None:
    """A version other than ``VERSION`` as Triton reads it: a number ("01" is 1), else
    INVALID_ARGUMENT; any other number NOT_FOUND."""
    # ASCII digits only: int() also reads other scripts' digits, a sign and whitespace
    # ("\u0661", "+1", " 1" were version 1; Triton refuses them).
    # (And at most 18 digits: int() refuses over 4,300 with a ValueError of its own.)
    number = int(version) if version.isascii() and version.isdigit() and len(version) < 19 else -1
    if number < 0:
        raise InvalidArgument(
            f"model version {clip(version)} is not a version number; give {VERSION} or none"
        )
    if number != int(VERSION):
        raise NotFound(
            f"model {clip(name)} has no version {clip(version)}; it has version {VERSION}"
        )


def priority_level(params, levels: int = 0, default_level: int = 0) -> int:
    """Triton: 1 is the highest priority, larger numbers lower, 0 the default. Internally
    larger is more urgent, and a request that gives no priority is 0 on every model. The
    level orders the model's own queue only: a device shared by models orders their work
    by deadline (server/scheduling/device.py; review helper-306). Without ``levels``, level
    p is 1,000,000 - p, above the default. With them (model.yaml's priority_levels), as
    Triton: 0 or a level past ``levels`` is ``default_level`` (0: the last); levels before
    it are 1,000,000 - p, it is 0, and those after it are below 0 - a client may rank
    below the default (review 190)."""
    level = 0.0
    if "priority" in params:
        level = number(params["priority"], "priority")
        if not math.isfinite(level) or level < 0 or level != int(level):
            raise InvalidArgument(f"priority must be a whole number >= 0, got {level}")
    if levels:
        default = default_level or levels
        if level == 0 or level > levels or level == default:
            return 0
        return 1_000_000 - int(level) if level < default else default - int(level)
    if level == 0 or level >= 1_000_000:  # past the lowest level: the default, as Triton
        return 0
    return 1_000_000 - int(level)

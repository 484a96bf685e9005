"""Triton's LogSettings RPC over innfer's logging: an operator reads, and raises or lowers,
the server's log level while it runs (tritonclient's ``get_log_settings`` /
``update_log_settings``) instead of restarting it with another ``--log-level``.

Triton's switches map onto innfer's one threshold (the ``innfer`` logger's level):
``log_verbose_level`` > 0 is DEBUG; else the lowest of ``log_info`` (INFO), ``log_warning``
(WARNING), ``log_error`` (ERROR) that is on; all off is CRITICAL. While verbose the switches
read - and, unless sent, stay - as they were before it, as Triton keeps them apart: verbose
turned off again brings back the threshold it replaced. A threshold cannot log
info but not warnings: such a combination is refused, as are ``log_file`` (innfer logs to
stderr, JSON lines: the container's log) and a ``log_format`` other than ``default``.

No grpc here; errors are server.errors, mapped in server.service.
"""

from __future__ import annotations

import logging

from server.errors import FailedPrecondition, InvalidArgument
from server.limits import clip

log = logging.getLogger("innfer.log_settings")
# "level": the log_verbose_level last set (> 0), read back while at DEBUG; "below": the
# threshold in force when a client turned verbose on, brought back when it turns verbose
# off saying nothing of the other switches (Triton keeps them apart from the verbose level:
# errors-only, verbose 1, verbose 0 ended at INFO - review helper-261). None: verbose was on
# from the start (--log-level debug), the switches then read all on.
_verbose: dict[str, int | None] = {"level": 1, "below": None}

KINDS = {  # Triton's setting -> the SettingValue field that carries it
    "log_file": "string_param",
    "log_info": "bool_param",
    "log_warning": "bool_param",
    "log_error": "bool_param",
    "log_verbose_level": "uint32_param",
    "log_format": "string_param",
}
SWITCHES = (("log_info", logging.INFO), ("log_warning", logging.WARNING),
            ("log_error", logging.ERROR))  # fmt: skip


def current() -> dict[str, bool | int | str]:
    """Triton's settings as innfer logs now.

    Example:
        >>> logging.getLogger("innfer").setLevel(logging.WARNING)
        >>> current()["log_info"], current()["log_warning"], current()["log_verbose_level"]
        (False, True, 0)
    """
    level = logging.getLogger("innfer").getEffectiveLevel()
    verbose = level <= logging.DEBUG
    # While verbose, the switches as they were before it (Triton keeps them apart from the
    # verbose level): read back all on, a client that sent log_info with verbose 0 was
    # refused on a log_warning it had been told was on (review helper-270)
    switches = _verbose["below"] if verbose and _verbose["below"] else level
    return {
        "log_file": "",
        **{name: switches <= at for name, at in SWITCHES},
        "log_verbose_level": _verbose["level"] if verbose else 0,
        "log_format": "default",
    }


def update(settings, allowed: str | None) -> None:
    """Apply ``settings`` (LogSettingsRequest.settings: name -> SettingValue); ``allowed``:
    None where this client may change them, else why not (FailedPrecondition).

    Example:
        >>> from server.proto_gen import grpc_service_pb2 as pb
        >>> req = pb.LogSettingsRequest()
        >>> req.settings["log_verbose_level"].uint32_param = 1
        >>> update(req.settings, allowed=None)
        >>> logging.getLogger("innfer").level == logging.DEBUG
        True
    """
    if allowed is not None:
        raise FailedPrecondition(allowed)
    given, sent = dict(current()), set()
    for name, value in settings.items():
        if name not in KINDS:
            raise InvalidArgument(
                f"unknown log setting {clip(name)}; Triton's are {', '.join(KINDS)}"
            )
        kind = value.WhichOneof("parameter_choice")
        if kind is None:  # tritonclient sends a name with no value for None: leave it
            continue
        if kind != KINDS[name]:
            raise InvalidArgument(
                f"log setting {name!r} takes a {KINDS[name].removesuffix('_param')}, "
                f"got a {kind.removesuffix('_param')}"
            )
        given[name] = getattr(value, kind)
        sent.add(name)
    if given["log_file"]:
        raise InvalidArgument(
            "log_file is not supported: innfer logs JSON lines to stderr (the container's "
            "log); send log_file empty or leave it out"
        )
    if given["log_format"] != "default":
        raise InvalidArgument(
            f"log_format {clip(given['log_format'])} is not supported: innfer logs JSON "
            "lines ('default')"
        )
    if given["log_verbose_level"]:  # DEBUG logs every level: none may be sent off
        off = [name for name, _ in SWITCHES if name in sent and not given[name]]
        if off:
            raise InvalidArgument(
                f"innfer's log level is a threshold: log_verbose_level > 0 logs every level, "
                f"so {off[0]} cannot be off beside it"
            )
        _verbose["level"] = given["log_verbose_level"]
        # the switches kept apart for verbose 0: as they read before (``current``), or sent
        on = [at for name, at in SWITCHES if given[name]]
        _verbose["below"] = on[0] if on else logging.CRITICAL
        set_level(logging.DEBUG)
        return
    on = [at for name, at in SWITCHES if given[name]]
    if on and on != [at for _, at in SWITCHES][len(SWITCHES) - len(on) :]:
        raise InvalidArgument(
            "innfer's log level is a threshold: turn a lower level on only with every higher "
            "one (log_info needs log_warning and log_error; log_warning needs log_error)"
        )
    set_level(on[0] if on else logging.CRITICAL)


def set_level(level: int) -> None:
    """innfer's loggers at ``level``, the libraries' at INFO at the lowest (as
    ``server.app.setup_logging``: DEBUG at the root let grpc log a line per call)."""
    before = logging.getLogger("innfer").getEffectiveLevel()
    logging.getLogger("innfer").setLevel(level)
    logging.getLogger().setLevel(max(level, logging.INFO))
    if level != before:
        # Written whatever the level now is (handed to the handlers past the level check):
        # the record of who turned the logs down or up - ERROR <-> CRITICAL went unsaid
        # as a warning either side of the change (review 205).
        names = (logging.getLevelName(before), logging.getLevelName(level))
        log.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0,
                                  "log level %s -> %s (LogSettings)", names, None))  # fmt: skip

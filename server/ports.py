"""Ports the server listens on: what to say when one cannot be bound."""

from __future__ import annotations

import errno


def port_in_use(exc: OSError, message: str) -> OSError | None:
    """An OSError of ``exc``'s errno saying ``message`` (which port is taken, and the setting
    that chooses it) where ``exc`` is "address already in use" - the bare "[Errno 98]"
    named no setting - else None (re-raise ``exc`` as it is).

    Example:
        >>> error = port_in_use(OSError(errno.EADDRINUSE, "in use"), "metrics port 9 is in use")
        >>> str(error), error.errno == errno.EADDRINUSE
        ('metrics port 9 is in use', True)
        >>> port_in_use(OSError(errno.EACCES, "denied"), "...") is None
        True
    """
    if exc.errno != errno.EADDRINUSE:
        return None
    error = OSError(message)  # (its text alone: OSError(errno, text) prefixes "[Errno 98]")
    error.errno = exc.errno
    return error

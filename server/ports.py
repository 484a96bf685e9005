"""Ports the server listens on: what to say when one cannot be bound, and one socket for
both IP families where the host is a wildcard."""

from __future__ import annotations

import errno
import socket

# Hosts that mean "every interface": a port then listens on IPv6 and IPv4 both, as gRPC's
# does for the same host (a pod on an IPv6 single-stack cluster is reached over IPv6).
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# What binding "::" raises where the kernel has no IPv6 (disabled at boot, or no address).
NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


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


def dual_stack_socket(port: int) -> socket.socket | None:
    """A non-blocking TCP socket bound to ``port`` on "::" that takes IPv4 too (IPV6_V6ONLY
    off: IPv4 clients arrive as ::ffff:a.b.c.d, whatever net.ipv6.bindv6only says), for a
    wildcard host; None where the kernel has no IPv6 (bind "0.0.0.0" then). Not listening
    yet: the server that takes it listens. Other errors (the port in use) are raised.

    Example:
        >>> sock = dual_stack_socket(0)
        >>> sock is None or sock.family == socket.AF_INET6
        True
    """
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in NO_IPV6:
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's own
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno in NO_IPV6:
            return None
        raise
    return sock

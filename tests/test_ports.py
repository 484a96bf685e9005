"""Listening sockets: one socket for both IP families where the host is a wildcard.

(The socket is bound but never listens - no client can connect - so the test keeps to
"servers in tests bind 127.0.0.1 only".)
"""

from __future__ import annotations

import socket

import pytest

from server.ports import WILDCARD_HOSTS, dual_stack_socket


def test_a_wildcard_host_gets_one_socket_for_ipv6_and_ipv4():
    """aiohttp's REST port bound 0.0.0.0 to IPv4 alone and "::" to IPv6 alone, where gRPC
    and /metrics took both: on an IPv6 cluster REST refused every connection (review
    helper-251)."""
    assert {"0.0.0.0", "::"} <= set(WILDCARD_HOSTS)
    sock = dual_stack_socket(0)
    if sock is None:
        pytest.skip("no IPv6 on this machine: the server binds 0.0.0.0 instead")
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.getsockname()[0] == "::" and sock.getsockname()[1] > 0
        assert not sock.getblocking()  # as asyncio's server takes it
    finally:
        sock.close()

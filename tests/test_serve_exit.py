"""``innfer serve``'s exit after a stop whose grace ran out with an engine still in its call:
the interpreter's own shutdown ended that daemon thread with C++ frames on its stack -
std::terminate, exit 134 in 3 of 8 such stops (review helper-253). The stand-in server
below replaces the real one: only serve()'s ending is under test."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import server.app as app
from server.config import ServerConfig


class _StandIn:
    def __init__(self, config, cut_short: bool) -> None:
        self.cut_short = False
        self._cut = cut_short
        self.plane = type("Plane", (), {"drain": lambda self: None})()

    async def start(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the stop, at once (as during a start-up)
        await asyncio.sleep(0.1)  # handled: serve() then neither tunes nor freezes

    async def stop(self) -> None:
        self.cut_short = self._cut


@pytest.mark.parametrize("cut_short", [True, False])
def test_a_stop_cut_short_ends_the_process_without_the_interpreters_shutdown(
    monkeypatch, cut_short
):
    exits = []
    monkeypatch.setattr(app, "Server", lambda config: _StandIn(config, cut_short))
    monkeypatch.setattr(app.os, "_exit", exits.append)
    monkeypatch.setattr(app, "raise_open_files", lambda: None)
    config = ServerConfig.from_dict({"repository": ".", "tune_malloc": False})
    asyncio.run(app.serve(config))
    assert exits == ([0] if cut_short else [])

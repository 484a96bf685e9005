"""server/loop_idle.py: the event loop's waits for I/O, counted on its real selector."""

from __future__ import annotations

import asyncio
import socket

from server.loop_idle import idle_watch


def test_a_loop_with_nothing_to_run_counts_a_wait():
    async def body():
        watch = idle_watch(asyncio.get_running_loop())
        assert idle_watch(asyncio.get_running_loop()) is watch  # one per loop
        before = watch.waits
        await asyncio.sleep(0.002)
        return watch.counting, watch.waits - before

    counting, waits = asyncio.run(body())
    assert counting and waits >= 1


def test_ready_callbacks_and_pending_io_are_not_waits():
    """A loop busy with callbacks never waits; nor does one whose next event is already
    there (a readable socket: the request queued behind the one just served)."""

    async def body():
        loop = asyncio.get_running_loop()
        watch = idle_watch(loop)
        await asyncio.sleep(0)
        before = watch.waits
        for _ in range(50):  # each turn has a callback ready: select(0), never a wait
            await asyncio.sleep(0)
        busy = watch.waits - before
        a, b = socket.socketpair()
        try:
            a.setblocking(False)
            b.setblocking(False)
            b.send(b"x")  # already readable when the loop looks
            got = loop.create_future()
            loop.add_reader(a, lambda: got.done() or got.set_result(a.recv(1)))
            before = watch.waits
            assert await got == b"x"
            pending = watch.waits - before
            loop.remove_reader(a)
        finally:
            a.close()
            b.close()
        return busy, pending

    assert asyncio.run(body()) == (0, 0)


def test_a_loop_without_a_selector_always_reads_as_idle():
    class NoSelector:  # e.g. uvloop: nothing to wrap
        pass

    watch = idle_watch(NoSelector())
    assert not watch.counting
    assert watch.waits != watch.waits  # every reading differs: "went idle" stays true

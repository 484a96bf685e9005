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


def test_deferred_work_runs_when_the_loop_is_about_to_wait_in_order():
    async def body():
        loop = asyncio.get_running_loop()
        watch = idle_watch(loop)
        ran = []
        watch.defer(ran.append, 1)
        watch.defer(ran.append, 2)
        for _ in range(20):  # busy turns (a callback always ready): nothing runs yet
            await asyncio.sleep(0)
        busy = list(ran)
        await asyncio.sleep(0.002)  # the loop waits: the work runs first
        return busy, ran

    assert asyncio.run(body()) == ([], [1, 2])


def test_flush_runs_deferred_work_now_and_a_failure_does_not_stop_the_rest(caplog):
    async def body():
        watch = idle_watch(asyncio.get_running_loop())
        ran = []
        watch.defer(lambda: 1 / 0)
        watch.defer(ran.append, "after")
        flushed = watch.flush()
        return flushed, ran, watch.flush()

    assert asyncio.run(body()) == (True, ["after"], False)
    assert "deferred" in caplog.text and "ZeroDivisionError" in caplog.text


def test_callbacks_scheduled_by_deferred_work_run_without_waiting_out_a_timer():
    """The select that ran the work was about to wait until the next timer (here 5 s):
    what the work scheduled (a freed device slot waking another model) runs at once."""

    async def body():
        loop = asyncio.get_running_loop()
        watch = idle_watch(loop)
        timer = loop.call_later(5.0, lambda: None)
        woken = asyncio.Event()
        await asyncio.sleep(0)
        watch.defer(loop.call_soon, woken.set)
        t0 = loop.time()
        await asyncio.wait_for(woken.wait(), 2.0)
        timer.cancel()
        return loop.time() - t0

    assert asyncio.run(body()) < 0.5


def test_without_a_selector_deferred_work_runs_at_once():
    class NoSelector:
        pass

    watch = idle_watch(NoSelector())
    ran = []
    watch.defer(ran.append, 1)
    assert ran == [1]


def test_without_a_selector_a_failing_deferred_call_is_logged_not_raised(caplog):
    # As on a watched loop: the caller (a batch's answer path) goes on whatever the
    # bookkeeping does.
    class NoSelector:
        pass

    watch = idle_watch(NoSelector())
    ran = []
    watch.defer(lambda: 1 / 0)
    watch.defer(ran.append, "next")
    assert ran == ["next"]
    assert "ZeroDivisionError" in caplog.text

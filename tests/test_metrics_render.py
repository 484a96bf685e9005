"""/metrics rendering is paced: one page at a time, at most METRICS_RENDER_SHARE of the
time, and a scrape never gets a page begun before it came (server.metrics._PacedApp)."""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from server.metrics import METRICS_RENDER_SHARE, Metrics, _PacedApp


class FakeTime:
    """A clock the app under test reads, and a sleep that moves it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _app(fake: FakeTime, render_s: float):
    """A page that takes ``render_s`` of the fake clock and says how many it rendered."""
    pages = []

    def app(environ, start_response):
        fake.now += render_s
        pages.append(environ.get("HTTP_ACCEPT_ENCODING"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"pages ", str(len(pages)).encode()]

    return app, pages


def _get(app, **environ) -> bytes:
    seen = []
    body = b"".join(app({"PATH_INFO": "/metrics", **environ}, lambda s, h: seen.append(s)))
    assert seen == ["200 OK"]
    return body


def test_renders_back_to_back_wait_so_rendering_takes_at_most_its_share():
    fake = FakeTime()
    app, pages = _app(fake, render_s=0.01)
    paced = _PacedApp(app, share=0.1, clock=fake.clock, sleep=fake.sleep)
    assert _get(paced) == b"pages 1" and fake.slept == []  # the first scrape never waits
    assert _get(paced) == b"pages 2"  # a new scrape: a new page, after the rest
    assert [round(s, 6) for s in fake.slept] == [0.09]  # 0.01 s rendering = 10 % of 0.1 s
    fake.now += 60.0  # a scrape 15-60 s after the last (Prometheus) does not wait
    assert _get(paced) == b"pages 3" and len(fake.slept) == 1
    assert len(pages) == 3


def test_the_rest_after_a_slow_page_is_capped():
    # A 300 ms page held the next scrape 2.7 s (and one of another format behind it
    # longer), near Prometheus' 10 s timeout (review helper-152).
    from server.metrics import METRICS_MAX_REST_S

    fake = FakeTime()
    app, _ = _app(fake, render_s=0.3)
    paced = _PacedApp(app, share=0.1, clock=fake.clock, sleep=fake.sleep)
    _get(paced)
    _get(paced)
    assert [round(s, 6) for s in fake.slept] == [METRICS_MAX_REST_S] and METRICS_MAX_REST_S <= 1


def test_a_page_is_shared_only_by_scrapes_that_came_before_it_began():
    fake = FakeTime()
    app, pages = _app(fake, render_s=0.01)
    paced = _PacedApp(app, clock=fake.clock, sleep=fake.sleep)
    _get(paced)
    # A scrape that came before the page began (its clock reading earlier) takes it ...
    came = fake.now - 1.0
    clock = iter([came])
    paced._clock = lambda: next(clock, fake.now)
    assert _get(paced) == b"pages 1" and len(pages) == 1
    # ... one that came after renders its own, and another format never takes this one.
    paced._clock = fake.clock
    assert _get(paced) == b"pages 2"
    assert _get(paced, HTTP_ACCEPT_ENCODING="gzip") == b"pages 3" and pages[-1] == "gzip"


def test_concurrent_scrapes_of_the_served_endpoint_are_fresh_and_coalesced():
    # Many scrapes at once rendered a page each, all at once, under the serving process's
    # GIL. Each must still show the count made before it was sent.
    metrics = Metrics(CollectorRegistry())
    state = {"value": 0, "collects": 0, "inside": 0, "most_inside": 0}
    lock = threading.Lock()

    class Slow:
        def collect(self):
            with lock:
                state["inside"] += 1
                state["most_inside"] = max(state["most_inside"], state["inside"])
            threading.Event().wait(0.02)  # a page of many series
            with lock:
                state["inside"] -= 1
                state["collects"] += 1
            yield GaugeMetricFamily("test_value", "the value when rendered", value=state["value"])

    metrics.registry.register(Slow())
    server, _ = metrics.serve_http(0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    stale = []

    def scrape(i: int) -> None:
        with lock:
            state["value"] += 1
            sent = state["value"]
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        shown = float(next(x for x in text.splitlines() if x.startswith("test_value ")).split()[1])
        if shown < sent:
            stale.append((i, sent, shown))

    try:
        threads = [threading.Thread(target=scrape, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.shutdown()
        server.server_close()
    assert stale == []
    assert state["most_inside"] == 1  # one page at a time (12 at once before)
    assert METRICS_RENDER_SHARE <= 0.25

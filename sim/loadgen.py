"""``innfer bench``: load generators over gRPC (the real tritonclient.grpc.aio).

``run_load`` is open loop: arrivals come from the simulator's traces (same seed, same
times), whether or not earlier requests were answered. ``run_closed_loop`` is closed loop:
N clients, each sending its next request as soon as the previous one is answered or
refused. Each request carries its budget as ``latency_budget_ms`` (plus any extra request
parameters the caller gives, e.g. innfer's ``tier`` pin); the client measures latency and
checks it against the budget. Servers that answer without a ``tier`` response parameter (other
OIP servers) are recorded with tier None. Bounded in count and time, and only loopback
addresses are accepted.

Open loop, a request's latency runs from its scheduled send time (start + its arrival), not
from when the client got round to sending it: a client that falls behind its schedule
(its own CPU) sends late, and that wait is the server's queue it did not see, so it counts;
each request's send lag (actual send - scheduled) is kept and summarised
(``send_lag_p50_ms``, ``send_lag_p99_ms``, ``send_lag_max_ms``) so that a lagging client
shows. An exception other than the server's (tritonclient's InferenceServerException) is
recorded per request as ``CLIENT_ERROR: <type>`` and the client goes on; an exception that
escapes a client task anyway is raised by the run, not left unread.

Example:
    >>> report = asyncio.run(run_load("127.0.0.1:8001", "mnist", arrivals, budgets,
    ...                               inputs))  # doctest: +SKIP
    >>> report = asyncio.run(run_closed_loop("127.0.0.1:8001", "mnist", 8, 2000, 30.0,
    ...                                      lambda i: 0.030, inputs))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NO_ANSWER = "NO_ANSWER"  # sent, but the run's time bound passed before an answer came
CLIENT_ERROR = "CLIENT_ERROR"  # "CLIENT_ERROR: <exception type>": failed in the client
# The call's own gRPC deadline passed (``deadline=True``) before any answer: gRPC says only
# "Deadline Exceeded". Kept apart from the server's DEADLINE_EXCEEDED, a refusal whose
# message says why, so that a run's "refused" shows which were the server's decisions.
CALL_DEADLINE = "DEADLINE_EXCEEDED (call deadline)"
DRAIN_S = 30.0  # after the last send: how long to wait for outstanding answers


@dataclass
class LoadReport:
    summary: dict
    latency_ms: np.ndarray  # nan where the request failed
    tiers: list[str | None]
    codes: list[str]  # "OK", a gRPC status name, "unsent", NO_ANSWER or "CLIENT_ERROR: <type>"
    budgets_s: np.ndarray | None = None  # each request's budget (closed loop draws them)
    first_error: str | None = None  # "<code>: <message>" of the first refusal seen
    # (n, 3) ms per request as the server reported them (innfer's response parameters
    # queue_us, compute_us, budget_us); NaN where it did not say
    server_ms: np.ndarray | None = None
    # open loop: ms from each request's scheduled send time to its actual send (NaN unsent)
    send_lag_ms: np.ndarray | None = None

    def breakdown(self) -> dict | None:
        """Where answered requests' time went, by the server's own account: ``outside`` =
        client latency - (queue + compute), the time the server's clock does not see
        (transport, parsing before the request is stamped, encoding and sending after);
        and why late requests were late: ``late_in_server`` (queue + compute past the
        budget the server planned with) or ``late_outside`` (the rest). Percentiles in ms;
        None when the server reported nothing."""
        if self.server_ms is None:
            return None
        known = ~np.isnan(self.latency_ms) & ~np.isnan(self.server_ms).any(axis=1)
        if not known.any():
            return None
        lat, (queue, compute, planned) = self.latency_ms[known], self.server_ms[known].T
        outside = lat - queue - compute
        late = lat > self.budgets_s[known] * 1e3 if self.budgets_s is not None else None
        pct = {f"p{q}": float(np.percentile(outside, q)) for q in (10, 50, 90, 99)}
        out = {"answered_with_times": int(known.sum()), "outside_ms": pct,
               "queue_ms_p50": float(np.median(queue)),
               "compute_ms_p50": float(np.median(compute))}  # fmt: skip
        if self.budgets_s is not None:  # what the server took off each budget (margin, overhead)
            short = self.budgets_s[known] * 1e3 - planned
            out["planned_short_ms"] = {f"p{q}": float(np.percentile(short, q)) for q in (50, 99)}
        if late is not None:
            in_server = late & (queue + compute > planned)
            out["late_in_server"] = int(in_server.sum())
            out["late_outside"] = int((late & ~in_server).sum())
        return out

    def onset(self, first: int) -> dict | None:
        """What the server did with the first ``first`` requests (in the order sent) and
        with the rest, apart: a fresh server, and a fresh channel, pay at the start of load
        what the run's whole figure spreads over it. Per part: requests, within budget,
        late, refused (sent, no answer) and attainment (within / requests; unsent requests
        are misses too). None where either part would be empty or no budgets are known.

        Example:
            >>> r = LoadReport({}, np.array([40.0, 10.0, 10.0, np.nan]), [], ["OK"] * 3 +
            ...                ["UNAVAILABLE"], np.full(4, 0.030))
            >>> r.onset(1)["first"]["slo_attainment"], r.onset(1)["rest"]["refused"]
            (0.0, 1)
        """
        n = len(self.latency_ms)
        if first < 1 or first >= n or self.budgets_s is None:
            return None
        ok = ~np.isnan(self.latency_ms)
        met = ok & (self.latency_ms <= np.asarray(self.budgets_s) * 1e3)
        sent = np.array([c != "unsent" for c in self.codes]) if self.codes else ok

        def part(sl: slice) -> dict:
            k = len(met[sl])
            return {"requests": k, "within_budget": int(met[sl].sum()),
                    "late": int((ok[sl] & ~met[sl]).sum()),
                    "refused": int((sent[sl] & ~ok[sl]).sum()),
                    "slo_attainment": float(met[sl].sum() / k)}  # fmt: skip

        return {"first_requests": first, "first": part(slice(0, first)),
                "rest": part(slice(first, n))}  # fmt: skip


def check_loopback(address: str) -> None:
    """ValueError unless ``address`` is HOST:PORT on a loopback host with a port in
    [1, 65535] (127.0.0.1:abc or :99999 reached the run and ended "is a server
    listening?")."""
    host, _, port = address.rpartition(":")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"address {address!r}: give HOST:PORT with a port in [1, 65535]")
    host = host.strip("[]")
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"innfer bench only targets loopback addresses (127.0.0.0/8, ::1); got {host!r}"
        )


async def run_load(
    address: str,
    model: str,
    arrivals: np.ndarray,
    budgets_s: np.ndarray,
    inputs: dict[str, np.ndarray] | Callable[[int], dict[str, np.ndarray]],
    max_seconds: float = 600.0,
    accuracy: dict[str, float] | None = None,
    parameters: dict | None = None,
    deadline: bool = False,
    drain_s: float = DRAIN_S,
) -> LoadReport:
    """Send one request per arrival time (seconds from start; none later than
    ``max_seconds``: "unsent"); wait for the answers, ``drain_s`` at most after the last
    send (what has none by then is NO_ANSWER, a miss - the report covers the run anyway).
    Latency is timed from each request's scheduled time (start + its arrival), so a send
    the client made late counts its wait; the lag of each send is in ``send_lag_ms`` and
    summarised as ``send_lag_p50_ms`` / ``send_lag_p99_ms`` / ``send_lag_max_ms``.
    ``parameters``: extra request parameters sent with every request (the budget is set
    per request and takes precedence). ``deadline``: also set each request's gRPC deadline
    to its budget (tritonclient's ``client_timeout``), as a client that gives up then
    does; past it the client reports DEADLINE_EXCEEDED, a miss like a late answer. The
    deadline and the budget sent count from the actual send, so a request the client sent
    late may come back late rather than DEADLINE_EXCEEDED: a miss either way. ``inputs``:
    the same arrays for every request, or ``inputs(i)`` for request ``i``: one of a few
    dicts (a recorded trace's row counts), each made into request tensors once."""
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    check_loopback(address)
    n = len(arrivals)
    rec = _Record(n, "unsent", parameters, deadline)
    async with tca.InferenceServerClient(address) as client:
        same = None if callable(inputs) else _tensors(tca, inputs)
        # id(feeds) -> (feeds, their tensors): made once per dict, not per send (the dict is
        # held so that its id cannot name another one)
        made: dict[int, tuple[dict, list]] = {}

        def tensors_for(i: int) -> list:
            feeds = inputs(i)
            if id(feeds) not in made:
                made[id(feeds)] = (feeds, _tensors(tca, feeds))
            return made[id(feeds)][1]

        async def one(i: int, scheduled: float) -> None:
            rec.codes[i] = NO_ANSWER  # until an answer or an error comes
            budget = float(budgets_s[i])
            tensors = same if same is not None else tensors_for(i)
            await rec.send(client, model, tensors, i, budget, InferenceServerException, scheduled)

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            if at > max_seconds:
                break
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, start + float(at))))
        await _finish(tasks, drain_s)
        wall = time.perf_counter() - start
    first = rec.errors[0] if rec.errors else None
    summary = _summary(rec.latency, budgets_s, rec.tiers, rec.codes, wall, accuracy, first)
    summary.update(_lag_summary(rec.lag))
    budgets = np.asarray(budgets_s)
    return LoadReport(
        summary, rec.latency, rec.tiers, rec.codes, budgets, first, rec.server_ms, rec.lag
    )


async def run_closed_loop(
    address: str,
    model: str,
    concurrency: int,
    n_requests: int,
    max_seconds: float,
    budget_fn: Callable[[int], float],
    inputs: dict[str, np.ndarray] | Callable[[int], dict[str, np.ndarray]],
    accuracy: dict[str, float] | None = None,
    drain_s: float = DRAIN_S,
    parameters: dict | None = None,
    deadline: bool = False,
) -> LoadReport:
    """``concurrency`` clients on one channel, each sending its next request as soon as its
    previous one is answered or refused, until ``n_requests`` are sent or ``max_seconds``
    have passed (no send after that but each client's first; answers are awaited
    ``drain_s`` more, then counted as NO_ANSWER). Request ``i`` (in send order) carries
    the budget ``budget_fn(i)`` seconds and the extra request ``parameters``, if any (the
    budget takes precedence), and with
    ``deadline`` a gRPC deadline of the same length (see ``run_load``). ``inputs``:
    the same arrays for every request, or ``inputs(i)`` for request ``i`` (object arrays of
    bytes are sent as BYTES: text). The report covers the requests sent: sent = within
    budget + late + refused. A request that fails in the client (not a server refusal) is
    ``CLIENT_ERROR: <type>`` and its client goes on with the next.

    Example:
        >>> r = asyncio.run(run_closed_loop("127.0.0.1:8001", "mnist", 8, 2000, 30.0,
        ...                                 lambda i: 0.030, inputs))  # doctest: +SKIP
        >>> r.summary["within_budget"] / r.summary["sent"]  # doctest: +SKIP
        0.97
    """
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    check_loopback(address)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if n_requests < 0 or not max_seconds > 0:
        raise ValueError(
            f"need n_requests >= 0 and max_seconds > 0, got {n_requests} and {max_seconds}"
        )
    rec = _Record(n_requests, "unsent", parameters, deadline)
    budgets = np.full(n_requests, np.nan)
    sent = 0
    async with tca.InferenceServerClient(address) as client:
        same = None if callable(inputs) else _tensors(tca, inputs)
        start = time.perf_counter()

        async def client_loop() -> None:
            nonlocal sent
            # Each client's first request goes whatever the clock says: N clients are N
            # requests outstanding, and clients started after a short max_seconds sent
            # nothing - 1,000 clients for 1 ms sent 0 requests (review helper-236).
            first = True
            while sent < n_requests and (first or time.perf_counter() - start < max_seconds):
                first = False
                i, sent = sent, sent + 1
                rec.codes[i] = NO_ANSWER
                try:
                    budgets[i] = float(budget_fn(i))
                    tensors = same if same is not None else _tensors(tca, inputs(i))
                except Exception as exc:  # this request fails in the client; go on
                    rec.client_error(i, exc)
                    await asyncio.sleep(0)  # let the other clients run
                    continue
                await rec.send(client, model, tensors, i, budgets[i], InferenceServerException)

        # (no more clients than requests: a million clients for 10 requests took 17 s and
        # 1.26 GB of tasks)
        tasks = [asyncio.create_task(client_loop()) for _ in range(min(concurrency, n_requests))]
        await _finish(tasks, max_seconds + drain_s)
        wall = time.perf_counter() - start
    latency, budgets = rec.latency[:sent], budgets[:sent]
    tiers, codes = rec.tiers[:sent], rec.codes[:sent]
    first = rec.errors[0] if rec.errors else None
    summary = _summary(latency, budgets, tiers, codes, wall, accuracy, first)
    summary["concurrency"] = concurrency
    return LoadReport(summary, latency, tiers, codes, budgets, first, rec.server_ms[:sent])


async def _finish(tasks: list[asyncio.Task], timeout: float) -> None:
    """Wait for ``tasks`` ``timeout`` s at most, cancel the rest (their requests stay
    NO_ANSWER), and read every task's outcome: requests record their own failures, so an
    exception that still ended a task is a fault of the load generator, raised here (once
    all tasks are done) rather than left as "Task exception was never retrieved"."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for o in outcomes:
        if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError):
            raise o


def _lag_summary(lag_ms: np.ndarray) -> dict:
    """p50 / p99 / max of the send lags (ms) of the requests sent (None when none was)."""
    lag = lag_ms[~np.isnan(lag_ms)]
    if not len(lag):
        return {"send_lag_p50_ms": None, "send_lag_p99_ms": None, "send_lag_max_ms": None}
    return {
        "send_lag_p50_ms": float(np.percentile(lag, 50)),
        "send_lag_p99_ms": float(np.percentile(lag, 99)),
        "send_lag_max_ms": float(lag.max()),
    }


class _Record:
    """Per request: latency (ms, NaN without an answer), serving tier (None where the server
    did not say), status code, send lag (ms behind its schedule, open loop; NaN unsent or
    unscheduled); and the error messages in the order they came."""

    def __init__(
        self, n: int, code: str, parameters: dict | None = None, deadline: bool = False
    ) -> None:
        self.parameters = dict(parameters or {})
        self.deadline = deadline  # send the budget as the gRPC deadline too
        self.latency = np.full(n, np.nan)
        self.tiers: list[str | None] = [None] * n
        self.codes = [code] * n
        self.errors: list[str] = []
        self.server_ms = np.full((n, 3), np.nan)  # queue, compute, planned budget
        self.lag = np.full(n, np.nan)

    def client_error(self, i: int, exc: Exception) -> None:
        """Request ``i`` failed in the client, not in the server: no answer, code
        ``CLIENT_ERROR: <type>``."""
        self.latency[i] = np.nan
        self.tiers[i] = None
        self.server_ms[i] = np.nan
        self.codes[i] = f"{CLIENT_ERROR}: {type(exc).__name__}"
        self.errors.append(f"{self.codes[i]}: {exc}")

    async def send(
        self,
        client,
        model: str,
        tensors,
        i: int,
        budget_s: float,
        error,
        scheduled: float | None = None,
    ) -> None:
        """Request ``i`` with ``latency_budget_ms`` and the extra parameters; record its answer,
        its gRPC error (``error``: the server's exception type), or any other exception as a
        client error. ``scheduled``: the ``time.perf_counter()`` the request was due to be
        sent (open loop): its latency is timed from then and its lag recorded; without it,
        from the send."""
        params = {**self.parameters, "latency_budget_ms": float(budget_s * 1e3)}
        t_send = time.perf_counter()
        t0 = t_send if scheduled is None else scheduled
        if scheduled is not None:
            self.lag[i] = (t_send - scheduled) * 1e3
        try:
            deadline = {"client_timeout": budget_s} if self.deadline else {}
            r = await client.infer(model, tensors, parameters=params, **deadline)
            self.latency[i] = (time.perf_counter() - t0) * 1e3
            p = r.get_response().parameters
            tier = p.get("tier")
            self.tiers[i] = tier.string_param if tier is not None else None
            for k, key in enumerate(("queue_us", "compute_us", "budget_us")):
                if key in p:
                    self.server_ms[i, k] = p[key].int64_param / 1e3
            self.codes[i] = "OK"
        except error as exc:
            self.latency[i] = np.nan
            self.codes[i] = _code(exc)
            self.errors.append(f"{self.codes[i]}: {exc.message()}")
        except Exception as exc:  # not the server's refusal: the client failed; go on
            self.client_error(i, exc)


def _tensors(tca, inputs: dict[str, np.ndarray]) -> list:
    tensors = []
    for name, x in inputs.items():
        t = tca.InferInput(name, list(x.shape), _oip(x.dtype))
        t.set_data_from_numpy(x)
        tensors.append(t)
    return tensors


def _code(exc) -> str:
    """A tritonclient exception's gRPC status name ("DEADLINE_EXCEEDED"), or
    ``CALL_DEADLINE`` where gRPC itself ended the call at its deadline."""
    code = str(exc.status()).removeprefix("StatusCode.")
    if code == "DEADLINE_EXCEEDED" and exc.message() == "Deadline Exceeded":
        return CALL_DEADLINE
    return code


def _summary(latency, budgets_s, tiers, codes, wall, accuracy, first_error=None) -> dict:
    """Figures over all ``len(latency)`` requests: ``slo_attainment`` = answered within
    budget / requests (a refusal, no answer or unsent request is a miss); ``late`` = answered
    after its budget; ``refused_total`` = sent without an answer (by code in ``refused``,
    where ``CALL_DEADLINE``, ``NO_ANSWER`` and ``CLIENT_ERROR`` are the client's side), so
    that ``sent`` = ``within_budget`` + ``late`` + ``refused_total``;
    ``mean_served_accuracy`` over the answers whose tier ``accuracy`` knows, and
    ``answers_without_accuracy`` the answers from tiers it does not know."""
    n = len(latency)
    ok = ~np.isnan(latency)
    met = ok & (latency <= np.asarray(budgets_s) * 1e3)
    mix = Counter(t for t in tiers if t)
    served = int(ok.sum())
    # A tier the caller has no accuracy for (an auto-tiering choice's frontier candidate,
    # "s069", beside profile.json's tiers) is left out of the mean and counted.
    known = [accuracy[t] for t in tiers if t and t in accuracy] if accuracy else []
    unknown = sum(v for t, v in mix.items() if t not in accuracy) if accuracy else None
    return {
        "requests": n,
        "slo_attainment": float(met.sum() / n) if n else 1.0,
        "mean_served_accuracy": float(np.mean(known)) if known else None,
        "answers_without_accuracy": unknown,
        "tier_mix": {k: v / max(served, 1) for k, v in sorted(mix.items())},
        "p50_latency_ms": float(np.percentile(latency[ok], 50)) if served else None,
        "p99_latency_ms": float(np.percentile(latency[ok], 99)) if served else None,
        "goodput_per_s": float(met.sum() / wall) if wall else 0.0,
        "refused": {k: v for k, v in Counter(codes).items() if k != "OK"},
        "wall_seconds": wall,
        "sent": sum(c != "unsent" for c in codes),
        "within_budget": int(met.sum()),
        "late": int((ok & ~met).sum()),
        "refused_total": sum(c not in ("OK", "unsent") for c in codes),
        "first_error": first_error,
    }


def _oip(dtype: np.dtype) -> str:
    return {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32",
            "uint8": "UINT8", "bool": "BOOL", "object": "BYTES"}[np.dtype(dtype).name]  # fmt: skip

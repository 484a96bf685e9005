"""Auto-tiering's choice: which K tiers of the frontier serve the recorded traffic best.

A tier set is judged by replaying recorded requests (arrival times, budgets, rows) through
the server's own scheduler on a virtual clock (``sim.simulator.replay``), with the engine
times of the candidates as the frontier measured them. Its score is the expected served
accuracy - the mean over requests of the serving tier's accuracy, 0 for a request not
answered within its budget - less a steep penalty where attainment falls below a floor:

    score = mean(accuracy if met else 0) - PENALTY * max(0, floor - attainment)
    floor = min(slo_target, attainment the traffic allows) - attainment_slack

where the attainment the traffic allows is the best of the live set's, the fastest
candidate's alone and that of a set spread over the whole frontier - each only as the
goals allow it: the fastest candidate that fits ``max_memory_mb`` alone, the spread less its
largest members until it fits, and the live set only where it keeps every goal itself
(``max_tiers``, ``max_memory_mb``, ``accuracy_floor``; hand-written tiers before the first
choice may not). A live set that breaks a goal is no yardstick - its attainment, bought
with what the goals forbid, would penalise every allowed set - and is replaced by the best
allowed set whatever the gain (``Choice.live_breaks`` says why). So accuracy is
maximised at the SLO target, or - where the traffic makes the target unreachable - at the
best attainment within reach less ``auto_tiers.attainment_slack`` (default 0.002: replay
noise), never bought with more deadlines than the operator allows. The search: over the frontier's
Pareto candidates thinned to distinct latencies (``thin``, at one row and at a full batch),
greedy (add the tier that raises the score most, up to ``max_tiers``, stopping when none
does), then moves of one member to a neighbour on the frontier while any improves it. With
``keep_fastest`` (the default; for ``max_tiers`` >= 2) the set starts from, and keeps, the
fastest candidate - where the fastest at one row and the fastest at a full batch differ, the
one that alone serves the traffic better (one row at a time, or saturated): a choice is made
for the traffic of the last ``window_s`` and swapped in a check interval, a choice and a
reload later, and a set without a fast tier misses every tight budget meanwhile; with one,
the scheduler absorbs a shift at once (bench/auto_tiers.py: after the shift the ResNet's
previous set, without it, served tight budgets for ~44 s before the swap). Every set is
replayed on the same requests with the same engine-time draws (one seed), so two sets
differ by what they are, not by luck. ``accuracy_floor`` bounds the candidates,
``max_memory_mb`` a set's weights.

Example:
    >>> traffic = Traffic.read("traffic.csv")  # doctest: +SKIP
    >>> options = frontier_options(frontier)  # doctest: +SKIP
    >>> choice = choose(options, traffic, config.auto_tiers, (live, names))  # doctest: +SKIP
    >>> choice.best.tiers, choice.gain  # doctest: +SKIP
    (('w100', 's069', 'w050', 'w031'), 0.021)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.repository.config import AutoTiersConfig
from runtime.repository.frontier import Frontier
from server.scheduling import TierInfo
from server.scheduling.latency import DEFAULT_SLO_TARGET, tiers_from_profile
from server.traffic import summarise_traffic, write_traffic
from sim.live_host import LiveHost
from sim.simulator import SimConfig, replay

PENALTY = 100.0  # score lost per unit of attainment below the floor: 0.1 per 0.1 point
STEP = 0.1  # candidates closer than this in latency (relative) are one option
TRAFFIC_COLUMNS = ("arrival_s", "budget_ms", "rows")
MAX_ROWS = 2**31 - 1  # rows one recorded request may have (a gRPC message holds fewer)


def _header_advice(unknown: list[str]) -> str:
    """What to do with a traffic CSV header's unknown column names: the expected name each
    one is a typo of ('budgets_ms': "drop them" left a header still refused; review 176),
    else drop them."""
    if not unknown:
        return ""
    near = {h: difflib.get_close_matches(h.lower(), TRAFFIC_COLUMNS, n=1, cutoff=0.6)
            for h in unknown}  # fmt: skip
    if any(near.values()):
        fixes = ", ".join(f"{h!r} -> {m[0]!r}" for h, m in near.items() if m)
        return f" (rename: {fixes})"
    return f" (unknown columns: {', '.join(unknown)}; drop them)"


@dataclass(frozen=True)
class Traffic:
    """Recorded requests: arrival time (s, non-decreasing), latency budget (ms), rows."""

    arrival_s: np.ndarray
    budget_ms: np.ndarray
    rows: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.budget_ms) != n or len(self.rows) != n:
            raise ValueError("traffic columns must have one entry per request each")
        if n and (np.any(np.diff(self.arrival_s) < 0) or not np.all(np.isfinite(self.arrival_s))):
            raise ValueError("traffic arrival times must be finite and non-decreasing")
        if n and (not np.all(self.budget_ms > 0) or np.any(self.rows < 1)):  # NaN too
            raise ValueError("traffic budgets must be > 0 ms and rows >= 1")

    def __len__(self) -> int:
        return len(self.arrival_s)

    def check_rows(self, max_batch: int, source: str) -> None:
        """ValueError where a request has more rows than ``max_batch`` (no server admits
        it): the replay stopped midway with "request has 5 rows; the maximum batch is 4",
        naming neither the file nor the request."""
        if len(self.rows) and int(self.rows.max()) > max_batch:
            k = int(np.argmax(self.rows > max_batch))
            raise ValueError(
                f"{source}: the request at arrival_s {self.arrival_s[k]:g} has "
                f"{int(self.rows[k])} rows, more than the model's max_batch ({max_batch}); "
                "split it, or raise max_batch and rebuild"
            )

    def last(self, n: int) -> Traffic:
        """The most recent ``n`` requests, their arrivals starting at 0."""
        a = self.arrival_s[-n:]
        return Traffic(a - (a[0] if len(a) else 0.0), self.budget_ms[-n:], self.rows[-n:])

    def summary(self) -> dict:
        """Request count, mean rate and budget quantiles: what the choice was made for."""
        return summarise_traffic(self.arrival_s, self.budget_ms, self.rows)

    def write(self, path: str | Path) -> None:
        write_traffic(Path(path), self.arrival_s, self.budget_ms, self.rows)

    @classmethod
    def read(cls, path: str | Path) -> Traffic:
        """A CSV with a header ``arrival_s,budget_ms[,rows]`` (what the server records;
        ``rows`` defaults to 1), UTF-8 with or without a byte-order mark (Excel's). Errors
        are ValueErrors that name the file (and line) and say what to do."""
        if not Path(path).is_file():  # (said as "[Errno 2] ...", naming no flag: review 160)
            what = "is a directory" if Path(path).is_dir() else "does not exist"
            raise ValueError(
                f"{path} {what}: give the traffic CSV (arrival_s,budget_ms[,rows]) a server "
                "with auto_tiers records, or one you write"
            )
        # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM, which read as part of 'arrival_s'.
        with open(path, newline="", encoding="utf-8-sig") as f:
            # '#' comment lines go before csv sees them - anywhere, as in a file of
            # timestamps - and line numbers stay the file's (``reader.line_num`` counts what
            # csv read: ``_uncommented`` keeps them in step; review 193).
            reader = csv.reader(_uncommented(f))
            try:
                return cls._parse(path, reader)
            except UnicodeDecodeError as exc:  # a .gz, a spreadsheet, UTF-16
                byte = exc.object[exc.start : exc.start + 1].hex()
                raise ValueError(
                    f"{path}: not a UTF-8 CSV (byte 0x{byte}: compressed? decompress it "
                    "first; a spreadsheet? save it as CSV UTF-8)"
                ) from None
            except csv.Error as exc:  # a NUL byte, a field over csv's 128 KiB limit
                raise ValueError(
                    f"{path}:{reader.line_num}: not a traffic CSV ({exc}); expected lines "
                    "arrival_s,budget_ms[,rows]"
                ) from None

    @classmethod
    def _parse(cls, path: str | Path, reader) -> Traffic:
        cols: list[list[float]] = [[], [], []]
        row = next(reader, None)
        while row is not None and not any(h.strip() for h in row):  # blank or comment lines
            row = next(reader, None)
        if row is None:  # (nothing but comments and blank lines; review 193)
            raise ValueError(f"{path}: no header: the file holds only comments or blank lines")
        header = [h.strip() for h in row]
        # Exactly these: a third column of another name ('priority') was read as rows,
        # and the choice made for batches of 4 (served accuracy 6 % against 89 %).
        if header not in (list(TRAFFIC_COLUMNS[:2]), list(TRAFFIC_COLUMNS)):
            other = [h for h in header if h not in TRAFFIC_COLUMNS]
            if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
                # one column holding every name: another separator (Excel's ';' locales),
                # not columns to drop
                advice = " (the file must be comma-separated; save it as CSV with commas)"
            elif header and all(_number(h) for h in header):
                # timestamps alone (what simulate --trace-file takes): a header to add, and
                # budgets - not "unknown columns: 0.005700; drop them" (review 164)
                advice = (
                    " (a line of numbers: put the header first, and each request's budget "
                    "beside its arrival - a server writes such a file to <model>/auto/.../"
                    "traffic.csv)"
                )
            else:
                advice = _header_advice(other)
            raise ValueError(
                f"{path}: the first line must be the header 'arrival_s,budget_ms' or "
                f"'arrival_s,budget_ms,rows', got {','.join(header)!r}{advice}"
            )
        last = -math.inf
        for line in reader:
            i = reader.line_num
            if not line:
                continue
            if not 2 <= len(line) <= len(header):  # (a line without rows: 1 row)
                raise ValueError(
                    f"{path}:{i}: {len(line)} values for the {len(header)} columns "
                    f"{','.join(header)}"
                )
            try:
                values = [float(v) for v in line]
            except ValueError:
                raise ValueError(f"{path}:{i}: not numbers: {','.join(line)!r}") from None
            rows = values[2] if len(values) > 2 else 1.0
            # int() would raise OverflowError on inf and cut 1.7 to 1 unsaid; numpy's int64
            # overflowed on 1e20 ("internal error").
            if not (math.isfinite(rows) and 1 <= rows <= MAX_ROWS and rows == int(rows)):
                raise ValueError(
                    f"{path}:{i}: rows must be a whole number in [1, {MAX_ROWS}], got "
                    f"{line[2].strip()!r}"
                )
            # checked here as well as by the class: a large file's bad line is named
            if not (math.isfinite(values[0]) and values[0] >= last):
                raise ValueError(
                    f"{path}:{i}: arrival_s {line[0].strip()!r} is not finite or is before the "
                    "line above's (arrivals must be finite and non-decreasing)"
                )
            if not (math.isfinite(values[1]) and values[1] > 0):  # inf: nan quantiles, NaN JSON
                raise ValueError(
                    f"{path}:{i}: budget_ms must be a finite number > 0, got {line[1].strip()!r}"
                )
            last = values[0]
            cols[0].append(values[0])
            cols[1].append(values[1])
            cols[2].append(int(rows))
        try:
            return cls(np.array(cols[0]), np.array(cols[1]), np.array(cols[2], dtype=int))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Evaluation:
    """One tier set replayed on the traffic."""

    tiers: tuple[str, ...]
    score: float
    attainment: float
    mean_accuracy: float | None  # over answered requests
    served_accuracy: float  # over all requests, 0 where the budget was missed
    mean_width: float | None  # nominal width over answered requests
    tier_mix: dict[str, float]
    memory_mb: float
    # Each tier's name and channel counts, sorted: what makes two sets the same (a
    # hand-written tier and a frontier candidate may share a name, not their channels).
    identity: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Choice:
    """The chosen set, the live one, and every set the search evaluated; ``live_breaks``:
    the goals the live set itself breaks (then it is replaced whatever the gain)."""

    best: Evaluation
    current: Evaluation
    evaluated: list[Evaluation]
    traffic: dict
    live_breaks: tuple[str, ...] = ()

    @property
    def gain(self) -> float:
        """Score of the chosen set minus the live one's (what ``rebuild.min_gain`` bounds):
        the gain in expected served accuracy where both meet the attainment floor; where
        the live set misses it, its shortfall counts PENALTY per unit."""
        return self.best.score - self.current.score

    @property
    def changes(self) -> bool:
        """Whether the chosen set differs from the live one in a tier's name or channels."""
        return self.best.identity != self.current.identity

    def worth(self, min_gain: float) -> bool:
        """Whether to apply the choice: it changes the set, and it gains ``min_gain`` or the
        live set breaks a goal (a set the goals forbid is not kept for its score)."""
        return self.changes and (self.gain >= min_gain or bool(self.live_breaks))

    def to_json(self) -> dict:
        return {
            "best": _public(self.best),
            "current": _public(self.current),
            "gain": self.gain,
            "served_accuracy_gain": self.best.served_accuracy - self.current.served_accuracy,
            "attainment_gain": self.best.attainment - self.current.attainment,
            "traffic": self.traffic,
            "evaluated": len(self.evaluated),
            "live_breaks": list(self.live_breaks),
        }


def _uncommented(lines):
    """``lines`` with each '#' comment line blanked (kept as an empty line, so that the csv
    reader's ``line_num`` stays the file's line number)."""
    for line in lines:
        yield "\n" if line.lstrip().startswith("#") else line


@dataclass(frozen=True)
class Option:
    """A tier that may be served: its scheduler view, p50 table, width, memory and channel
    counts (None: unknown - the name alone identifies it)."""

    tier: TierInfo
    p50: dict[int, float]
    width: float
    memory_mb: float
    sizes: Mapping[str, int] | None = None


def frontier_options(
    frontier: Frontier,
    floor: float | None = None,
    step: float = STEP,
    max_memory_mb: float | None = None,
) -> dict[str, Option]:
    """The Pareto candidates among the frontier's at or above ``floor`` accuracy whose
    weights alone fit ``max_memory_mb`` (``Frontier.pareto_within``), as options, thinned
    (``thin``), fastest first. The memory limit
    comes before the thinning: a run's most accurate candidate stood for the run, and where
    it alone was too large, a run member that fits - possibly the only candidate that did -
    was dropped, and every choice failed while ``Frontier.unmet_goals`` said the goals
    could be met."""
    keep = frontier.pareto_within(floor, max_memory_mb)
    if not keep:  # said from the whole frontier, as the build and the server say it
        goals = AutoTiersConfig(accuracy_floor=floor, max_memory_mb=max_memory_mb)
        raise ValueError(frontier.unmet_goals(goals))
    # Thinned at one row and at a full batch, as the Pareto marks are: thinned at a full
    # batch alone, the candidate fastest at one row went where a faster-batched one stood
    # for its run - the ResNet's w031, 1.45 ms alone against w025's 1.49, served tight
    # light traffic 2.6 points more accurately at the same attainment (bench/auto_tiers.py).
    thinned = {c.name for b in (1, frontier.max_batch) for c in thin(keep, b, step)}
    keep = sorted(
        (c for c in keep if c.name in thinned), key=lambda c: c.p50_ms(frontier.max_batch)
    )
    infos, p50 = tiers_from_profile(frontier.profile([c.name for c in keep]), _by_name(keep))
    return {
        t.name: Option(t, p50[t.name], c.width, c.memory_mb, c.sizes)
        for t, c in zip(infos, keep, strict=True)
    }


def thin(candidates: list, batch: int, step: float = STEP) -> list:
    """Fastest first (p50 at ``batch``), candidates within ``step`` (relative) of the
    fastest of a run are one option: the most accurate of the run stands for it; a run's
    choice is kept only where it is more accurate than the previous one kept. The fastest
    candidate is always kept. Timing noise
    makes many near-equal points Pareto-optimal; telling them apart costs simulations and
    buys nothing the scheduler could use.

    Example:
        >>> [c.name for c in thin(frontier.pareto(), 8)]  # doctest: +SKIP
        ['w031', 'w038', 'w044', 'w062', 'w075', 'w088', 'w100']
    """
    ordered = sorted(candidates, key=lambda c: c.p50_ms(batch))
    runs: list[list] = []
    for c in ordered:
        if runs and c.p50_ms(batch) < runs[-1][0].p50_ms(batch) * (1 + step):
            runs[-1].append(c)
        else:
            runs.append([c])
    out = [ordered[0]]  # the fastest always: what deadlines fall back to
    for run in runs:
        best = max(run, key=lambda c: c.accuracy)
        if best.accuracy > out[-1].accuracy:
            out.append(best)
    return out


def profile_options(
    profile: dict,
    records: Mapping,
    memory_mb: Mapping[str, float],
    full_channels: int | None = None,
) -> dict:
    """Options for tiers served from a profile.json and their build records (the
    hand-written set), for comparison with the frontier's. ``full_channels``: the full
    width's channel total, for the nominal width of a tier given as channels per group."""
    infos, p50 = tiers_from_profile(profile, records)
    out = {}
    for t in infos:
        rec = records[t.name]
        width = _nominal(rec.width, rec.sizes, full_channels)
        out[t.name] = Option(t, p50[t.name], width, memory_mb.get(t.name, 0), rec.sizes)
    return out


def outcomes(
    options: Mapping[str, Option],
    names: Sequence[str],
    traffic: Traffic,
    sim: SimConfig,
    host: LiveHost | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Replay ``traffic`` with the tiers ``names``. Per request: met (answered within its
    budget), the serving tier's accuracy (0 where not answered), its width (nan where not
    answered); and the simulator's summary. ``host``: the live server's time outside queue
    and compute, its planning, its engine speed and spread, its handling's CPU per row
    (``sim.live_host``); None: engine time only, as profiled, every budget planned whole."""
    tiers = [options[n].tier for n in names]
    p50 = {n: options[n].p50 for n in names}
    budgets = traffic.budget_ms / 1e3
    planned, grace, speed, host_s, batch_host_s = None, 0.0, 1.0, 0.0, 0.0
    if host is not None:
        budgets, planned, grace = host.budgets(budgets, sim.seed)
        speed, host_s = host.engine_speed, host.host_cpu_ms / 1e3
        batch_host_s = host.host_cpu_batch_ms / 1e3
        if host.engine_sigma is not None:
            sim = dataclasses.replace(sim, noise=host.engine_sigma)
    r = replay(tiers, p50, traffic.arrival_s, budgets, sim, rows=traffic.rows,
               planned=planned, grace=grace, speed=speed, host_s=host_s,
               batch_host_s=batch_host_s)  # fmt: skip
    met = ~np.isnan(r.finish) & (r.finish <= traffic.arrival_s + budgets + 1e-12)
    acc = np.array([options[t].tier.accuracy if t else 0.0 for t in r.tiers])
    width = np.array([options[t].width if t else np.nan for t in r.tiers])
    return met, acc, width, r.summary


def evaluate(
    options: Mapping[str, Option],
    names: Sequence[str],
    traffic: Traffic,
    sim: SimConfig,
    floor: float | None = None,
    host: LiveHost | None = None,
) -> Evaluation:
    """Replay ``traffic`` with the tiers ``names`` (``host`` as ``outcomes`` takes it); the
    score's attainment ``floor`` defaults to the SLO target (see the module doc)."""
    met, acc, width, summary = outcomes(options, names, traffic, sim, host)
    answered = ~np.isnan(width)
    served_acc = float(np.where(met, acc, 0.0).mean()) if len(met) else 0.0
    attainment = float(met.mean()) if len(met) else 1.0
    return Evaluation(
        tiers=tuple(sorted(names, key=lambda n: -options[n].tier.accuracy)),
        score=_penalised(served_acc, attainment, _or(floor, sim.slo_target)),
        attainment=attainment,
        mean_accuracy=float(acc[answered].mean()) if answered.any() else None,
        served_accuracy=served_acc,
        mean_width=float(width[answered].mean()) if answered.any() else None,
        tier_mix=dict(summary["tier_mix"]),
        memory_mb=sum(options[n].memory_mb for n in names),
        identity=tuple(sorted(_identity(n, options[n]) for n in names)),
    )


def choose(
    options: Mapping[str, Option],
    traffic: Traffic,
    goals: AutoTiersConfig,
    current: tuple[Mapping[str, Option], Sequence[str]],
    sim: SimConfig | None = None,
    progress: Callable[[int], None] | None = None,
    host: LiveHost | None = None,
) -> Choice:
    """The best set of at most ``goals.max_tiers`` among ``options`` for the most recent
    ``goals.simulate_requests`` requests of ``traffic``, and the live set (``current``:
    its options and names) replayed on the same requests. ``progress`` is called with the
    number of sets evaluated so far. ``host``: what the serving process adds to each
    request (``sim.live_host``; a server's choice passes it, offline ones may not).

    Example:
        >>> choice = choose(frontier_options(f), traffic, goals, (live, names))  # doctest: +SKIP
    """
    if len(traffic) == 0:
        raise ValueError("no traffic recorded: nothing to choose tiers for")
    sim = sim or SimConfig(slo_target=DEFAULT_SLO_TARGET)
    recent = traffic.last(goals.simulate_requests)
    live_options, live_names = current
    live = evaluate(live_options, list(live_names), recent, sim, host=host)
    breaks = live_breaks(live_options, live_names, goals)
    # Fastest first (p50 at the largest profiled batch, as ``thin`` orders the frontier).
    order = sorted(options, key=lambda n: options[n].p50[max(options[n].p50)])

    def fits(names) -> bool:
        return over_memory(options, names, goals) is None

    def fitting(names) -> list[str]:
        """``names`` less its largest members (memory) until the set fits the goals."""
        names = list(names)
        while names and not fits(names):
            names.remove(max(names, key=lambda n: options[n].memory_mb))
        return names

    # What the traffic allows: the fastest tier alone (no larger tier to tempt the planner
    # into work that later arrivals wait behind), or a spread over the frontier - each as
    # far as the goals allow it: a floor no allowed set can reach penalises every one. The
    # live set counts only where it keeps the goals itself, for the same reason.
    fastest = next(([n] for n in order if fits([n])), [])
    # The fastest candidate at one row, where it is not the fastest at a full batch (a
    # narrow layer set can win alone and lose batched): light traffic runs one row at a
    # time and needs it, saturated traffic the other; the replay says which this is.
    alone = min(order, key=lambda n: options[n].p50[min(options[n].p50)])  # its least rows
    quickest = [*fastest, *([alone] if fastest and alone not in fastest and fits([alone]) else [])]
    tried = [*([n] for n in quickest), fitting(_spread(order, goals.max_tiers))]
    seen = {frozenset(n): evaluate(options, n, recent, sim, host=host) for n in tried if n}
    reach = max((e.attainment for e in seen.values()), default=0.0)
    allowed = live.attainment if not breaks else 0.0
    floor = min(sim.slo_target, max(allowed, reach)) - goals.attainment_slack
    live = dataclasses.replace(live, score=_score(live, floor))
    # Those replays count for the search too, scored at the floor (each replay is the cost)
    cache = {k: dataclasses.replace(e, score=_score(e, floor)) for k, e in seen.items()}

    def run(names) -> Evaluation:
        key = frozenset(names)
        if key not in cache:
            cache[key] = evaluate(options, list(names), recent, sim, floor, host)
            if progress:
                progress(len(cache))
        return cache[key]

    # keep_fastest: the set starts from the fastest candidate and keeps it (see the doc);
    # of the fastest at a full batch and at one row, the one that serves this traffic
    # better alone (the first where equal). The rule is for sets of two tiers or more:
    # where nothing fits beside it (max_memory_mb), the fastest alone was applied - the
    # least accurate tier, 23 points below the full one that fitted alone (review
    # helper-283) - so a set of one is the best one alone, the fastest or not.
    keep = goals.keep_fastest and goals.max_tiers > 1 and bool(quickest)
    kept = [max(quickest, key=lambda n: run([n]).score)] if keep else []
    best = _search(order, kept, goals.max_tiers, run, fits)
    if best is None:  # (``options`` are those at or above the floor already)
        floor = goals.accuracy_floor
        which = f"at or above accuracy_floor {floor} " if floor else ""
        raise ValueError(
            f"no frontier candidate {which}fits max_memory_mb {goals.max_memory_mb}: the "
            f"smallest such needs "
            f"{min(o.memory_mb for o in options.values()):.3g} MiB; raise the limit"
            + (" or lower the floor" if floor else "")
        )
    if kept and len(best.tiers) == 1:
        one = _search(order, [], 1, run, fits)
        if one is not None and one.score > best.score:
            best = one
    return Choice(best, live, list(cache.values()), recent.summary(), breaks)


def _search(order: list[str], kept: list[str], max_tiers: int, run, fits) -> Evaluation | None:
    """The set ``choose`` picks: from ``kept`` (kept in it), add the member that scores best
    while that helps and the set has room (``max_tiers``, ``fits``), then move one member
    to a neighbour on the frontier (``order``) while that helps. ``run(names)``: the set's
    evaluation (cached). None: no candidate fits alone."""
    chosen: list[str] = list(kept)
    best: Evaluation | None = run(kept) if kept else None
    while len(chosen) < max_tiers:
        trials = [run([*chosen, n]) for n in order if n not in chosen and fits([*chosen, n])]
        top = max(trials, key=lambda e: e.score, default=None)
        if top is None or (best is not None and top.score <= best.score):
            break
        best, chosen = top, list(top.tiers)
    if best is None:
        return None
    improved = True
    while improved:  # move one member to a neighbour on the frontier while that helps
        improved = False
        for out in list(best.tiers):
            if out in kept:
                continue
            i = order.index(out)
            for n in order[max(0, i - 1) : i + 2]:
                if n in best.tiers:
                    continue
                names = [t for t in best.tiers if t != out] + [n]
                if fits(names) and (e := run(names)).score > best.score:
                    best, improved = e, True
                    break
            if improved:
                break
    return best


def live_breaks(
    options: Mapping[str, Option], names: Sequence[str], goals: AutoTiersConfig
) -> tuple[str, ...]:
    """The goals the set ``names`` breaks, each said with its numbers (empty: none):
    hand-written tiers serve until the first choice and need not keep ``auto_tiers``' goals.

    Example:
        >>> live_breaks(options, ["w025"], AutoTiersConfig(max_memory_mb=1.6))  # doctest: +SKIP
        ('its weights need 2 MiB, over max_memory_mb 1.6',)
    """
    out = []
    if len(names) > goals.max_tiers:
        out.append(f"it has {len(names)} tiers, over max_tiers {goals.max_tiers}")
    memory = over_memory(options, names, goals)
    if memory is not None:
        out.append(f"its weights need {memory:.4g} MiB, over max_memory_mb {goals.max_memory_mb}")
    if goals.accuracy_floor is not None:
        low = [n for n in names if options[n].tier.accuracy < goals.accuracy_floor]
        if low:
            accs = ", ".join(f"{n} {options[n].tier.accuracy:.4f}" for n in low)
            out.append(f"{accs} below accuracy_floor {goals.accuracy_floor}")
    return tuple(out)


def over_memory(
    options: Mapping[str, Option], names: Sequence[str], goals: AutoTiersConfig
) -> float | None:
    """The set's memory (MB: fp32 weights, what max_memory_mb counts) where it is over
    max_memory_mb, else None: the one rule both the choice and ``live_breaks`` apply."""
    memory = sum(options[n].memory_mb for n in names)
    limit = goals.max_memory_mb
    return memory if limit is not None and memory > limit else None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _penalised(served_accuracy: float, attainment: float, floor: float) -> float:
    """The score (module doc): served accuracy less PENALTY per unit below ``floor``."""
    return served_accuracy - PENALTY * max(0.0, floor - attainment)


def _score(e: Evaluation, floor: float) -> float:
    return _penalised(e.served_accuracy, e.attainment, floor)


def _spread(order: list[str], k: int) -> list[str]:
    """``k`` names spread evenly over ``order`` (fastest first), both ends included."""
    if len(order) <= k:
        return list(order)
    return [order[round(i * (len(order) - 1) / (k - 1))] for i in range(k)] if k > 1 else order[:1]


def _by_name(candidates) -> dict:
    return {c.name: c for c in candidates}


def _nominal(width, sizes: Mapping[str, int], full_channels: int | None) -> float:
    """A tier's width as one number: a fraction as it is; channels per group (or fractions
    per kind of group) as the share of the full width's channels its channel counts keep -
    the uniform width of the same total, as a shaped frontier candidate's - or 0 where the
    full width's total is unknown."""
    if isinstance(width, (int, float)):
        return float(width)
    return sum(sizes.values()) / full_channels if full_channels else 0.0


def _identity(name: str, option: Option) -> str:
    sizes = "" if option.sizes is None else json.dumps(dict(option.sizes), sort_keys=True)
    return f"{name} {sizes}"


def _public(e: Evaluation) -> dict:
    """An evaluation as the choice's JSON gives it (the names, without the channel counts)."""
    out = dataclasses.asdict(e)
    del out["identity"]
    return out


def _number(text: str) -> bool:
    """Whether ``text`` reads as a number (a data line where a header belongs)."""
    try:
        float(text)
    except ValueError:
        return False
    return True

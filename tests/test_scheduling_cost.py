"""One decision and one admission cost O(|Q|) - not O(|Q|^2) - with pins, min_tier and
multi-row requests queued. Counted, not timed (this machine is shared): the planner's own
probe (``Planner.work``: requests and batches it looked at) and how often Python code reads
a queued request's fields (numpy does the per-request work; Python touches only the head
of the queue). The wall-clock figures are bench/decision_cost.py's."""

from __future__ import annotations

import os

import numpy as np
import pytest

from server.scheduling import Request, Scheduler, TierInfo, make_policy

NAMES = ("w100", "w075", "w050", "w025")
ACCURACY = {"w100": 0.99, "w075": 0.985, "w050": 0.97, "w025": 0.93}
# Fast enough that a queue of 2,000 with these deadlines can be served: every plan check
# then runs through the whole queue (the expensive case).
FAST = {"w100": (0.33, 2.5), "w075": (0.2, 1.55), "w050": (0.12, 0.9), "w025": (0.06, 0.46)}
TIERS = [
    TierInfo(n, ACCURACY[n], {1: b1 * 1.1, 8: b8 * 1.1}, {1: b1, 8: b8})
    for n, (b1, b8) in FAST.items()
]
FIELDS = frozenset({"deadline", "rows", "pin", "min_tier", "priority", "arrival"})


class Counted(Request):
    """A request that counts reads of its scheduling fields."""

    reads = 0

    def __getattribute__(self, name):
        if name in FIELDS:
            Counted.reads += 1
        return super().__getattribute__(name)


def scheduler(n: int, seed: int = 0) -> Scheduler:
    """``n`` queued requests: 10% pinned, 10% with a min_tier, 20% of 2-4 rows; deadlines
    0.2-2 s out. Built without admission (its cost is measured separately)."""
    rng = np.random.default_rng(seed)
    sched = Scheduler(TIERS, make_policy("innfer", TIERS), max_batch=8, max_queue=n + 10)
    reqs = []
    for k in range(n):
        kw = {}
        u = rng.random()
        if u < 0.1:
            kw["pin"] = NAMES[rng.integers(4)]
        elif u < 0.2:
            kw["min_tier"] = NAMES[rng.integers(3)]
        if rng.random() < 0.2:
            kw["rows"] = int(rng.integers(2, 5))
        reqs.append(Counted(k, 0.0, float(rng.uniform(0.2, 2.0)), **kw))
    reqs[0] = Counted(0, 0.0, 0.1)  # an unconstrained head: every tier is a candidate
    reqs.sort(key=lambda r: r.deadline)
    for k, r in enumerate(reqs):
        sched.queue.append(r)
        sched._keys.append((0, r.deadline, k))
    sched.columns()  # the columns are kept as requests arrive, not built per decision
    sched._seq = iter(range(n, 10**9))
    return sched


def decision_cost(n: int) -> tuple[int, int]:
    """(Planner.work, request field reads) of one decision at ``n`` queued."""
    sched = scheduler(n)
    Counted.reads = 0
    d = sched.next(0.0)
    assert d is not None and d.requests
    return sched.policy.work, Counted.reads


def test_one_decision_is_linear_in_the_queue():
    costs = {n: decision_cost(n) for n in (250, 500, 1000, 2000)}
    work = {n: c[0] for n, c in costs.items()}
    reads = {n: c[1] for n, c in costs.items()}
    # The plan of the whole queue is looked at (a feasible deep queue): at least |Q|...
    assert all(work[n] >= n for n in work)
    # ... and linearly: doubling the queue at most doubles the work (+10% for rounding).
    for n in (250, 500, 1000):
        assert work[2 * n] <= 2.2 * work[n], work
    # Python reads a bounded number of requests per decision, whatever the queue's length:
    # the head batches' candidates (at most 4 B per tier) and the batch it starts.
    assert max(reads.values()) <= 4 * 8 * len(NAMES) * 6, reads
    assert reads[2000] <= reads[250] * 1.5 + 50, reads


@pytest.mark.parametrize("n", [500, 2000])
def test_one_admission_reads_only_the_new_request(n):
    sched = scheduler(n)
    Counted.reads = 0
    r = Counted(n + 1, 0.0, 1.0, rows=2, min_tier="w050")
    sched.submit(r, now=0.0)
    assert Counted.reads <= 40  # r's own fields; the queue ahead is read as columns
    assert r in sched.queue


@pytest.mark.parametrize("locators", ["user-provided", "none"])
def test_the_compiled_plan_loads_where_numba_has_nowhere_to_cache(locators):
    # pip installed as root, served by a user without a home: numba found no cache folder
    # and `innfer serve` stopped with "cannot cache function 'quantile': no locator
    # available" (review helper-299). Simulated by leaving numba only the locator that reads
    # NUMBA_CACHE_DIR (unset: the cache goes to a folder of the temporary folder), or none
    # (each process compiles anew).
    import subprocess
    import sys

    keep = "[caching.UserProvidedCacheLocator]" if locators == "user-provided" else "[]"
    code = (
        "from numba.core import caching\n"
        f"caching.CacheImpl._locator_classes = {keep}\n"
        "import numba, tempfile\n"
        "from server.scheduling import _kernel\n"
        "assert abs(_kernel.quantile(1.0, 0.0, 1.0) - 1.0) < 1e-12\n"
        "print(numba.config.CACHE_DIR.startswith(tempfile.gettempdir()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == "True"


def test_the_numba_cache_fallback_takes_only_a_folder_of_this_users_own(tmp_path, monkeypatch):
    # A predictable <tmp>/innfer-numba-<uid> made by another user (or open to them) let
    # them plant the index files numba unpickles: code run as the server's user (review
    # helper-302). Only a folder this user owns, writable by no one else, is used.
    import tempfile

    from server.scheduling._kernel import _private_cache_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / f"innfer-numba-{os.getuid()}"
    assert _private_cache_dir() == str(path) and (path.stat().st_mode & 0o777) == 0o700
    path.chmod(0o777)  # open to others: refused
    assert _private_cache_dir() is None
    path.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    path.symlink_to(tmp_path / "elsewhere")  # a link planted in its place: refused
    assert _private_cache_dir() is None


def test_the_numba_cache_fallback_compiles_without_a_cache_where_no_temp_folder_is_usable(
    monkeypatch,
):
    # A read-only root file system: tempfile.gettempdir() raised FileNotFoundError and the
    # import failed instead of compiling without a cache (review helper-303).
    import tempfile

    from server.scheduling._kernel import _private_cache_dir

    def unusable():
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", unusable)
    assert _private_cache_dir() is None

"""The plan's loops, compiled with numba (see ``plan``'s docstring for the rules they
implement and why they are compiled). Arrays in, arrays out; no Python objects.

Conventions: tier ranks index the latency tables' rows and a batch's rows their columns.
Compiled indexing is not bounds-checked, so the loops raise ValueError on a tier rank
outside the tables or a batch wider than them (``Scheduler`` never produces either:
``Scheduler.submit`` refuses requests wider than ``max_batch``), and ``plan``'s wrappers
check the indices they are handed. A batch end is compared as ``not (end <= deadline)``:
a NaN (an inf variance over an inf mean, a batch size a tier's profile does not reach)
is late - never on time - and admission's ``min`` keeps the inf. (The plain-Python path
for short queues this replaced counted such a NaN as on time, and numpy admission let it
through as NaN.)
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
from numba import njit


def _jit(fn):
    """``fn`` compiled with cache=True: once per machine into __pycache__ (or numba's user
    cache dir where the package is read-only); nogil: a decision does not hold up the
    server's other threads. Where neither can be written (pip installed as root, served by
    a user with no home: ``innfer serve`` stopped with "cannot cache function 'quantile':
    no locator available"; review helper-299) the cache goes to a folder of this user's in
    the temporary folder, or, failing that too, each process compiles anew."""
    import numba

    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
    if not numba.config.CACHE_DIR and (own := _private_cache_dir()) is not None:
        numba.config.CACHE_DIR = own  # (NUMBA_CACHE_DIR, where set, is the user's: kept)
        try:
            return njit(cache=True, nogil=True)(fn)
        except RuntimeError as exc:
            if "cannot cache" not in str(exc):
                raise
    return njit(nogil=True)(fn)


def _private_cache_dir() -> str | None:
    """``<tmp>/innfer-numba-<uid>``, made 0700 - or None where it exists and is not a
    folder this user alone owns and writes: numba unpickles the index files it finds there,
    and a folder another user made (or a symlink) let them run code as the server's user
    (review helper-302)."""
    import stat

    try:  # (no usable temporary folder at all: a read-only root file system - helper-303)
        path = os.path.join(tempfile.gettempdir(), f"innfer-numba-{os.getuid()}")
    except OSError:
        return None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
    return path if mine and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None


@_jit
def quantile(mean, var, z):
    """``latency.sum_quantile`` for one (mean, var): Fenton-Wilkinson's log-normal."""
    s2 = math.log1p(var / max(mean * mean, 1e-300))
    return mean * math.exp(z * math.sqrt(s2) - 0.5 * s2)


@_jit
def next_fit(ints, deadline, caps, of):
    """Per class - fastest allowed tier and group - next-fit batches of the queue's columns
    (``ints``: rows, lo, hi, group key; (4, n)) in queue order, numbered in the order of
    their first request; a class of fastest tier h batches up to ``caps[h]`` rows. Returns
    ``batch`` (4, n) - hi, lo, rows and head (queue index of the first request) of batch g
    in column g, the first G columns used - ``due`` (n,), each batch's earliest deadline
    (first G), and G; writes each request's batch into ``of`` (n,)."""
    rows, lo, hi, key = ints[0], ints[1], ints[2], ints[3]
    n = len(rows)
    batch = np.empty((4, n), np.int64)
    g_hi, g_lo, g_rows, g_head = batch[0], batch[1], batch[2], batch[3]  # views
    due = np.empty(n, np.float64)
    tiers = 0
    for i in range(n):
        if hi[i] < 0 or lo[i] < 0:
            raise ValueError("a tier rank is negative")
        if hi[i] >= len(caps):
            raise ValueError("a tier rank has no batch size")
        tiers = max(tiers, hi[i] + 1)
    # Dense group codes (0 .. groups - 1): every key 0 - no groups, the usual case - skips
    # the sort.
    grouped = False
    for i in range(n):
        if key[i] != 0:
            grouped = True
            break
    if grouped:
        uniq = np.unique(key)
        code = np.searchsorted(uniq, key)
        groups = len(uniq)
    else:
        code = key  # every code 0: no copy
        groups = 1
    open_batch = np.full(tiers * groups, -1, np.int64)  # class -> the batch being filled
    g = 0
    for i in range(n):
        c = code[i] * tiers + hi[i]
        k = open_batch[c]
        if k < 0 or g_rows[k] + rows[i] > caps[hi[i]]:
            k = g
            g += 1
            open_batch[c] = k
            g_hi[k], g_lo[k], g_rows[k], due[k], g_head[k] = hi[i], lo[i], 0, deadline[i], i
        else:
            g_lo[k] = max(g_lo[k], lo[i])
            due[k] = min(due[k], deadline[i])
        g_rows[k] += rows[i]
        of[i] = k
    return batch, due, g


@_jit
def groups(ints, deadline, caps):
    """``plan.Groups``' arrays for the queue's columns (``ints``: rows, lo, hi, group key;
    (4, n)):
    ``next_fit``'s ``batch`` and ``due``; ``index`` (3, n + 1) - ``of`` (row 0, first n),
    the queue indices of each batch's members in queue order (row 1, first n; batch g's
    from ``bounds[g]`` to ``bounds[g + 1]``) and ``bounds`` (row 2, first G + 1); and G.
    Few arrays: returning one costs about a microsecond."""
    n = ints.shape[1]
    index = np.zeros((3, n + 1), np.int64)
    of, order, bounds = index[0], index[1], index[2]  # views: they write into index
    batch, due, g = next_fit(ints, deadline, caps, of)
    for i in range(n):
        bounds[of[i] + 1] += 1
    for k in range(g):
        bounds[k + 1] += bounds[k]
    fill = bounds[:g].copy()
    for i in range(n):
        k = of[i]
        order[fill[k]] = i
        fill[k] += 1
    return batch, due, index, g


@_jit
def _earliest_slot(off, mean):
    """The slot whose expected free time (offset + mean so far) is earliest; the lowest
    index among equals."""
    best = 0
    for s in range(1, len(off)):
        if off[s] + mean[s] < off[best] + mean[best]:
            best = s
    return best


@_jit
def feasible(batch, due, index, n_groups, ints, deadline, mean, var, cand, z, others, now):
    """Per candidate k - ``cand[k]``: the tier rank the rest is planned at (T: each batch
    on its fastest), the head batch's mean and variance on this slot, whether a batch it
    took requests from moves to its first request left (1) or keeps its place (0), then
    its queue indices, -1 padded (floats holding small integers exactly) - whether every
    batch of ``groups``' plan that the head leaves ends by its deadline. Slots: this one
    (after the head), then ``others`` (their planning offsets); each batch on the slot that
    frees first, in the order of their first request (see ``plan.Candidate``)."""
    g_hi, g_lo, g_rows, g_head = batch[0], batch[1], batch[2], batch[3]
    of, order, bounds = index[0], index[1], index[2]
    rows, lo = ints[0], ints[1]
    n_cand, n_tiers, width, most = cand.shape[0], mean.shape[0], mean.shape[1], cand.shape[1] - 4
    ok = np.ones(n_cand, np.bool_)
    touched = np.full(n_groups, -1, np.int64)  # batch -> its row in left_* (this candidate)
    skip = np.empty(most, np.int64)
    hit = np.empty(most, np.int64)
    left_rows = np.empty(most, np.int64)
    left_due = np.empty(most, np.float64)
    left_lo = np.empty(most, np.int64)
    left_head = np.empty(most, np.int64)
    by_head = np.empty(most, np.int64)  # the touched batches' rows, by their new first request
    slots = 1 + len(others)
    off, m, v = np.empty(slots), np.empty(slots), np.empty(slots)
    for k in range(n_cand):
        # What the head batch leaves of each batch it takes requests from.
        n_skip = 0
        while n_skip < most and cand[k, 4 + n_skip] >= 0:
            skip[n_skip] = int(cand[k, 4 + n_skip])  # in range: plan.feasible checks
            n_skip += 1
        n_hit = 0
        for j in range(n_skip):
            b = of[skip[j]]
            if touched[b] < 0:
                touched[b] = n_hit
                hit[n_hit] = b
                left_rows[n_hit], left_due[n_hit], left_lo[n_hit] = 0, np.inf, 0
                left_head[n_hit] = len(rows)  # past every request: none left
                n_hit += 1
        moved = cand[k, 3] != 0.0
        for q in range(n_hit):
            b = hit[q]
            for p in range(bounds[b], bounds[b + 1]):
                i = order[p]
                gone = False
                for j in range(n_skip):
                    if skip[j] == i:
                        gone = True
                        break
                if not gone:
                    left_rows[q] += rows[i]
                    left_due[q] = min(left_due[q], deadline[i])
                    left_lo[q] = max(left_lo[q], lo[i])
                    left_head[q] = min(left_head[q], i)
            if not moved and left_rows[q]:
                left_head[q] = g_head[b]  # its old place
            # Insertion sort by the new first request (at most B touched batches).
            j = q
            while j > 0 and left_head[by_head[j - 1]] > left_head[q]:
                by_head[j] = by_head[j - 1]
                j -= 1
            by_head[j] = q
        off[0], m[0], v[0] = 0.0, cand[k, 1], cand[k, 2]
        for s in range(1, slots):
            off[s], m[s], v[s] = others[s - 1], 0.0, 0.0
        plan = int(cand[k, 0])
        b, p = 0, 0  # the next untouched batch; the next touched one (in by_head)
        while True:
            while b < n_groups and touched[b] >= 0:
                b += 1
            if p < n_hit and (b >= n_groups or left_head[by_head[p]] < g_head[b]):
                q = by_head[p]
                p += 1
                if left_rows[q] == 0:
                    continue  # emptied: takes no slot
                r, end_by, low, top = left_rows[q], left_due[q], left_lo[q], g_hi[hit[q]]
            elif b < n_groups:
                r, end_by, low, top = g_rows[b], due[b], g_lo[b], g_hi[b]
                b += 1
            else:
                break
            if r >= width:
                raise ValueError("a batch has more rows than the latency tables")
            if top >= n_tiers:
                raise ValueError("a tier rank is past the latency tables")
            t = plan if low <= plan <= top else top
            s = _earliest_slot(off, m) if slots > 1 else 0
            m[s] += mean[t, r]
            v[s] += var[t, r]
            if not (now + off[s] + quantile(m[s], v[s], z) <= end_by):
                ok[k] = False
                break
        for q in range(n_hit):
            touched[hit[q]] = -1
    return ok


@_jit
def admission(ints, left, at, r_rows, r_lo, r_hi, r_key, mean, var, caps, z, busy):
    """When a new request (``r_rows``, ``r_lo``, ``r_hi``, group ``r_key``) queued after the
    first ``at`` requests of the columns (``ints``: rows, lo, hi, group key; ``left``: each
    one's deadline, seconds from now) ends (seconds from now), the batches on their fastest
    allowed tiers after the slots free (``busy``: per slot), a batch of fastest tier h up to
    ``caps[h]`` rows: with its own batch, or, if sooner, added to an earlier batch of its
    group that runs on a tier it allows, has room for it and still ends by its own
    requests' earliest deadline (the planner forms no batch that misses its head's: a join
    that did admitted requests refused a few ms later - review helper-264)."""
    width = mean.shape[1]
    for h in range(len(caps)):
        if caps[h] >= width:
            raise ValueError("max_batch exceeds the latency tables' width")
    ahead = np.empty((4, at + 1), np.int64)  # the queue ahead, then the new request
    ahead[:, :at] = ints[:, :at]
    ahead[0, at], ahead[1, at], ahead[2, at], ahead[3, at] = r_rows, r_lo, r_hi, r_key
    due_in = np.empty(at + 1)
    due_in[:at] = left[:at]
    due_in[at] = np.inf  # the new request's own deadline is the caller's to check
    of = np.empty(at + 1, np.int64)
    batch, due, n_batches = next_fit(ahead, due_in, caps, of)
    g_hi, g_rows, g_head = batch[0], batch[2], batch[3]
    mine = of[at]
    off = np.sort(busy)
    m, v = np.zeros(len(busy)), np.zeros(len(busy))
    best = np.inf
    after = False  # the new request runs alone after the queue ahead (see below)
    for k in range(mine + 1):
        t, b = g_hi[k], g_rows[k]
        if b >= width:
            raise ValueError("a batch has more rows than the latency tables")
        if t >= mean.shape[0]:
            raise ValueError("a tier rank is past the latency tables")
        s = _earliest_slot(off, m)
        # Next-fit put it in a batch of earlier requests: one that would then end past their
        # deadline runs without it, and it in a batch of its own after the queue ahead (the
        # planner's order).
        joined = k == mine and g_head[k] != at
        if joined and off[s] + quantile(m[s] + mean[t, b], v[s] + var[t, b], z) > due[k]:
            after = True
            b -= r_rows
        m[s] += mean[t, b]
        v[s] += var[t, b]
        if k == mine:
            if not after:
                best = min(best, off[s] + quantile(m[s], v[s], z))
        # (b + r_rows <= caps[t] < width: checked above)
        elif r_lo <= t <= r_hi and b + r_rows <= caps[t] and ahead[3, g_head[k]] == r_key:
            dm = mean[t, b + r_rows] - mean[t, b]
            dv = var[t, b + r_rows] - var[t, b]
            end = off[s] + quantile(m[s] + dm, v[s] + dv, z)
            if end <= due[k]:
                best = min(best, end)
    if after:
        for k in range(mine + 1, n_batches):
            s = _earliest_slot(off, m)
            m[s] += mean[g_hi[k], g_rows[k]]
            v[s] += var[g_hi[k], g_rows[k]]
        s = _earliest_slot(off, m)
        t = g_hi[mine]
        best = min(best, off[s] + quantile(m[s] + mean[t, r_rows], v[s] + var[t, r_rows], z))
    return best

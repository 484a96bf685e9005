"""server.allocator: glibc's malloc keeps large request buffers in its heap once tuned.

The behaviour is process-wide, so it is observed in a fresh interpreter: the minor page
faults of allocating, touching and freeing 8 buffers of 600 KB at once (8 requests of a
3x224x224 image in flight), before and after ``tune_malloc``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.allocator import MMAP_THRESHOLD_MAX, MMAP_THRESHOLD_MIN, malloc_settings

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from server.allocator import malloc_settings, tune_malloc

def faults_per_cycle(cycles=20, live=8, size=600_000):
    def one():
        blocks = [b"\\x01" * size for _ in range(live)]  # malloc + memset: every page touched
        del blocks
    one()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        one()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / cycles

before = faults_per_cycle()
tuned = tune_malloc(malloc_settings(1_204_264, 256 * 2**20))
print(json.dumps({"before": before, "tuned": tuned, "after": faults_per_cycle()}))
"""


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="needs glibc")
def test_tuned_malloc_reuses_large_buffers_instead_of_faulting_them_in():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["tuned"] is True
    # Default glibc: the 4.8 MB freed at once is more than its (dynamic) trim threshold, so
    # it goes back to the kernel and the next 8 buffers fault ~147 pages each in again.
    assert got["before"] > 500, got
    assert got["after"] < 20, got


def test_settings_follow_the_message_limit_and_the_inflight_cap():
    s = malloc_settings(message_bytes=1_204_264, inflight_bytes=256 * 2**20)
    assert (s.mmap_threshold, s.trim_threshold) == (1_204_264, 256 * 2**20)
    # Small limits still cover a megabyte; glibc's ceiling caps large ones; the kept heap is
    # at least two of the largest blocks and fits mallopt's C int.
    assert malloc_settings(4096, 0) == type(s)(MMAP_THRESHOLD_MIN, 2 * MMAP_THRESHOLD_MIN)
    big = malloc_settings(2**31 - 1, 2**40)
    assert big.mmap_threshold == MMAP_THRESHOLD_MAX
    assert big.trim_threshold == 2**31 - 1

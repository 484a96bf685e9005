"""Request buffers reused, not mapped afresh: glibc's malloc tuned for a server whose messages
are hundreds of kilobytes.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and gives freed
memory above ``M_TRIM_THRESHOLD`` at the top of a heap back to the kernel; its dynamic rule
raises them only as far as the largest block freed so far (trim: twice that). With 8
requests of a 3x224x224 FP32 image (602 KB) in flight, 4.8 MB is freed at once, so every
buffer gRPC copies and protobuf parses is faulted in again, ~150 pages at a time: on this
2-core VM a grpc.aio echo server spent 1.8-2.0 ms of CPU per 600 KB request, most of it in
page faults under ``memcpy``; with both thresholds raised, 0.8-1.0 ms (either alone:
1.7-1.8 ms). A server whose engines freed larger blocks while loading already has high
thresholds (the ResNet of issue 18: 2-6 faults per request either way); tuning makes the
cost independent of what a model happened to allocate.

The thresholds: messages up to ``mmap_threshold`` bytes (glibc's ceiling: 32 MiB on 64-bit)
come from the heap, and up to ``trim_threshold`` bytes of freed heap stay mapped for reuse -
the server sets them to its message limit and to its cap on request bytes in flight (memory
it may hold for requests anyway), so a peak's memory is kept, not returned and faulted back.

Process-wide: ``innfer serve`` applies it at start (``ServerConfig.tune_malloc``); a process
that embeds the server keeps its own allocator settings.

Example:
    >>> settings = malloc_settings(message_bytes=1_204_264, inflight_bytes=256 * 2**20)
    >>> settings.mmap_threshold, settings.trim_threshold
    (1204264, 268435456)
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger("innfer.allocator")

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD_MIN = 1 * 2**20  # glibc's own dynamic threshold grows at least this far


@dataclass(frozen=True)
class MallocSettings:
    """Bytes: allocations up to ``mmap_threshold`` from the heap; up to ``trim_threshold``
    of freed heap kept mapped."""

    mmap_threshold: int
    trim_threshold: int


def malloc_settings(message_bytes: int, inflight_bytes: int) -> MallocSettings:
    """The thresholds for a server whose gRPC messages are at most ``message_bytes`` and
    whose request bytes in flight are capped at ``inflight_bytes``."""
    mmap = min(max(message_bytes, MMAP_THRESHOLD_MIN), MMAP_THRESHOLD_MAX)
    return MallocSettings(mmap, min(max(inflight_bytes, 2 * mmap), 2**31 - 1))  # a C int


def tune_malloc(settings: MallocSettings) -> bool:
    """Apply ``settings`` to this process's glibc malloc; False (and nothing changed) where
    there is no glibc (macOS, musl) or it refuses a value."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        log.info("malloc not tuned: no glibc")
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Order matters: setting M_MMAP_THRESHOLD turns glibc's dynamic thresholds off, which
    # would otherwise move the trim threshold again.
    ok = mallopt(M_MMAP_THRESHOLD, settings.mmap_threshold) == 1
    ok = ok and mallopt(M_TRIM_THRESHOLD, settings.trim_threshold) == 1
    if ok:
        log.info(
            "malloc: blocks up to %.1f MiB from the heap, %.0f MiB of freed heap kept",
            settings.mmap_threshold / 2**20,
            settings.trim_threshold / 2**20,
        )
    else:
        log.warning("malloc not tuned: glibc refused %s", settings)
    return ok

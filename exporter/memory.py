"""Keeping resident memory close to what the job history really holds.

A listing of 100,000 jobs allocates tens of megabytes that are free again once it
has been folded into the history. glibc keeps freed pages, and gives each thread
(every poller is one) an arena of its own, so without help the process would hold
about 100 bytes a job more than it uses; a container's memory limit counts them.
Both calls are no-ops where glibc is absent.

Large listings are not the only thing that leaves freed pages behind: bursts of
connections (TLS ones cost about 60 KiB each), large answers and reloads do too, so
``MemoryReturner`` also hands pages back on a timer whenever the heap holds more freed
memory than when it last looked: after any burst, whether resident memory grew since
the last look or not.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from typing import Any, Callable

_M_ARENA_MAX = -8


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist (glibc)
        return libc
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Share one malloc arena between threads; call before starting any.

    Python serialises most allocation under the GIL anyway, so threads gain little
    from arenas of their own and each costs its own fragmentation.
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1)


def release_free_memory() -> None:
    """Return freed heap pages to the operating system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes malloc holds freed but not handed back (glibc 2.33+ ``mallinfo2``:
    ``fordblks``, the free chunks and the top of the heap); None without glibc."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def resident_bytes() -> int:
    """This process's resident set size; 0 where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryReturner:
    """Calls ``release`` at most every ``every`` seconds, and only when the heap holds
    ``grown_bytes`` more freed memory than the least it held since the last release.

    Freed memory is what a release can hand back, so the rule reads it directly: a
    burst of connections that came and went leaves it high whatever resident memory
    did before (a release at the peak, while they were open, could hand back nothing),
    and memory really in use never triggers a release. A release leaves some freed
    chunks behind (those between live ones); their level after it is the new base, so
    a quiet process costs one ``mallinfo2`` call per look and no release. Without glibc
    the rule falls back on resident memory growing over its lowest.
    """

    def __init__(self, every: float = 5.0, grown_bytes: int = 4 * 1024 * 1024, *,
                 free: Callable[[], int | None] = free_heap_bytes,
                 rss: Callable[[], int] = resident_bytes,
                 release: Callable[[], None] = release_free_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._every, self._grown = every, grown_bytes
        self._free, self._rss, self._release, self._clock = free, rss, release, clock
        self._last = clock()
        self._base = self._held()

    def _held(self) -> int:
        free = self._free()
        return self._rss() if free is None else free

    def tick(self) -> bool:
        """Call often (the main loop does, every second); True when it released."""
        now = self._clock()
        if now - self._last < self._every:
            return False
        self._last = now
        held = self._held()
        if held <= self._base + self._grown:
            self._base = min(self._base, held)
            return False
        self._release()
        self._base = self._held()
        return True

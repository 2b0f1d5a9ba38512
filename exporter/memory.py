"""Keeping resident memory close to what the job history really holds.

A listing of 100,000 jobs allocates tens of megabytes that are free again once it
has been folded into the history. glibc keeps freed pages, and gives each thread
(every poller is one) an arena of its own, so without help the process would hold
about 100 bytes a job more than it uses; a container's memory limit counts them.
Both calls are no-ops where glibc is absent.

Large listings are not the only thing that leaves freed pages behind: bursts of
connections (TLS ones cost about 60 KiB each), large answers and reloads do too, so
``MemoryReturner`` also hands pages back on a timer whenever resident memory has
grown since it last looked.
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


def resident_bytes() -> int:
    """This process's resident set size; 0 where /proc is absent."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryReturner:
    """Calls ``release`` at most every ``every`` seconds, and only when resident memory
    has grown by ``grown_bytes`` over the lowest it was seen since the last release:
    memory really in use is not trimmed again and again."""

    def __init__(self, every: float = 5.0, grown_bytes: int = 4 * 1024 * 1024, *,
                 rss: Callable[[], int] = resident_bytes,
                 release: Callable[[], None] = release_free_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._every, self._grown = every, grown_bytes
        self._rss, self._release, self._clock = rss, release, clock
        self._last = clock()
        self._floor = rss()

    def tick(self) -> bool:
        """Call often (the main loop does, every second); True when it released."""
        now = self._clock()
        if now - self._last < self._every:
            return False
        self._last = now
        rss = self._rss()
        if rss <= self._floor + self._grown:
            self._floor = min(self._floor, rss)
            return False
        self._release()
        self._floor = self._rss()
        return True

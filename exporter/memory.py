"""Keeping resident memory close to what the job history really holds.

A listing of 100,000 jobs allocates tens of megabytes that are free again once it
has been folded into the history. glibc keeps freed pages, and gives each thread
(every poller is one) an arena of its own, so without help the process would hold
about 100 bytes a job more than it uses; a container's memory limit counts them.
Both calls are no-ops where glibc is absent.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

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

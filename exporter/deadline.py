"""A deadline for a request's answer as a whole.

A socket timeout bounds each read, so a server that trickles its status line, its
headers or a chunked body's size lines and trailers a byte at a time can hold a request
for as long as it likes. While a request waits for its answer, its connection
(``transport.ApiSession``) is registered with one watchdog thread for the process; past
the request's timeout the watchdog shuts the socket down and the wait ends as a timeout.

One thread and a heap, not a timer per request: arming costs a few microseconds, so
the hundreds of requests of a large poll pay nothing noticeable for it.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import Any


class _Watch:
    __slots__ = ("deadline", "sock", "active", "fired")

    def __init__(self, deadline: float, sock: Any) -> None:
        self.deadline, self.sock, self.active, self.fired = deadline, sock, True, False


class Watchdog:
    """Shuts down the socket of a watch that outlives its deadline."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: Any) -> _Watch:
        watch = _Watch(deadline, sock)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()       # a new earliest deadline
        return watch

    def disarm(self, watch: _Watch) -> None:
        """The answer is in (or failed). Under the lock, so a watch the thread is about
        to fire is never a connection already handed to the next request."""
        with self._cond:
            watch.active = False          # left in the heap; skipped when it comes up

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - self._clock()
                if left > 0:
                    self._cond.wait(left)
                    continue
                watch = heapq.heappop(self._heap)[2]
                watch.fired = True
                try:
                    watch.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass                  # already closed: nothing left to stop


WATCHDOG = Watchdog()

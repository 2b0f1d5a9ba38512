"""A deadline for the whole request, headers included.

requests' ``timeout`` bounds each socket read, so a server that trickles its status
line and headers a byte at a time can hold a poll for as long as it likes. Every
connection of our sessions therefore registers, while it waits for the answer's
headers, with one watchdog thread for the process; past ``timeout`` from the start of
the request the watchdog shuts the socket down, and the wait ends as a read timeout
(reason ``timeout``). The body is bounded the same way by the client's streamed read
(``client._read_body``), which gets what is left of the same budget.

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

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


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
        """The answer's headers are in. Under the lock, so a watch the thread is about
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


class _DeadlineMixin:
    """For urllib3 connections: the answer's headers must arrive within the request's
    read timeout, counted from when the request began to be sent."""

    timeout: Any
    sock: Any
    _request_started: float = 0.0

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._request_started = time.monotonic()
        super().request(*args, **kwargs)  # type: ignore[misc]

    def getresponse(self) -> Any:
        timeout = self.timeout
        if not isinstance(timeout, (int, float)) or self.sock is None:
            return super().getresponse()  # type: ignore[misc]
        watch = WATCHDOG.arm(self._request_started + timeout, self.sock)
        try:
            return super().getresponse()  # type: ignore[misc]
        except Exception:
            if watch.fired:       # urllib3 turns this into a read timeout
                raise TimeoutError("no complete answer headers within the timeout") \
                    from None
            raise
        finally:
            WATCHDOG.disarm(watch)


class DeadlineHTTPConnection(_DeadlineMixin, HTTPConnection):
    pass


class DeadlineHTTPSConnection(_DeadlineMixin, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = DeadlineHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections bound the wait for an answer's headers."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _DeadlineHTTPPool,
                                                   "https": _DeadlineHTTPSPool}

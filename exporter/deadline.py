"""What requests cannot do by itself, as one ``HTTPAdapter``: a deadline for the whole
request, pacing before it, and ``close()`` from another thread.

requests' ``timeout`` bounds each socket operation, so a server that trickles its
headers, a chunked body's size lines or its trailers a byte at a time can hold a request
for as long as it likes, and a closed ``requests.Session`` does not end a request that
is in flight. ``DeadlineAdapter`` therefore:

- waits for the request's turn (``pacer``, the rate limiter) before its deadline starts,
  and passes the session's ``guard`` while each attempt's request is written;
- opens a ``RequestScope`` for the request: every socket the request uses, from the
  connection being opened (TLS and proxy CONNECT included) to the answer's last byte,
  is registered with one watchdog thread for the process, which shuts it down at the
  deadline. The client reads the streamed body and then ends the scope (``finish``);
- sends a request again, once, when a kept-alive connection fails before any answer
  came (the server had closed it as it was reused; every call of this API only reads);
- on ``close()`` shuts down the sockets of requests in flight and wakes one waiting for
  its turn: both end within moments, as ``Interrupted``.

The sockets are watched through a duplicate of their file descriptor: wrapping a socket
in TLS detaches the original object, so only a duplicate can still shut down a handshake
that never ends, and shutting one down ends the reads of every descriptor of it.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import Any, Callable, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import ProxyManager


class Interrupted(requests.ConnectionError):
    """The session was closed while a request waited for its turn or was in flight."""


class _Watch:
    __slots__ = ("deadline", "sock", "active", "fired")

    def __init__(self, deadline: float, sock: socket.socket) -> None:
        self.deadline, self.sock, self.active, self.fired = deadline, sock, True, False


class Watchdog:
    """Shuts down the socket of a watch that outlives its deadline.

    One thread and a heap, not a timer per request: arming costs a few microseconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: socket.socket) -> _Watch:
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
        """Under the lock, so a watch the thread is about to fire is never a
        connection already handed to the next request."""
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
                _shut(watch.sock)


WATCHDOG = Watchdog()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                              # already closed: nothing left to stop


class RequestScope:
    """One request, from its connection to its answer's last byte: its deadline, the
    sockets it used, and what the retry of a stale connection needs to know."""

    def __init__(self, adapter: DeadlineAdapter, deadline: float) -> None:
        self.deadline = deadline
        self.guard = adapter.guard
        self.fresh = False            # it opened a new connection
        self.answered = False         # an answer's status line and headers arrived
        self._adapter = adapter
        self._watches: dict[int, _Watch] = {}     # by the watched socket's descriptor
        self._lock = threading.Lock()    # close()'s interrupt against end's closing

    @property
    def fired(self) -> bool:
        return any(watch.fired for watch in self._watches.values())

    def watch(self, sock: socket.socket) -> None:
        """Watch ``sock`` through a duplicate descriptor of its own, closed at ``end``."""
        with self._lock:
            if sock.fileno() in self._watches:
                return
            duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type)
            self._watches[sock.fileno()] = WATCHDOG.arm(self.deadline, duplicate)
            if self._adapter.closed:          # close() may have missed it: stop it here
                _shut(duplicate)

    def interrupt(self) -> None:
        with self._lock:
            for watch in list(self._watches.values()):
                _shut(watch.sock)

    def end(self) -> None:
        with self._lock:
            for watch in self._watches.values():
                WATCHDOG.disarm(watch)
                watch.sock.close()
        self._adapter._forget(self)


_current = threading.local()


def _scope() -> RequestScope | None:
    scope: RequestScope | None = getattr(_current, "scope", None)
    return scope


class _WatchedConnection:
    """For urllib3 connections: register the socket with the thread's request scope,
    as soon as it exists (before TLS or a proxy's CONNECT) or as a kept-alive one is
    reused."""

    sock: Any

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        scope = _scope()
        if scope is not None:
            scope.fresh = True
            scope.watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        """Write the request (every attempt: a retry passes the guard again), once the
        connection is up: a slow connect or handshake holds no guard."""
        scope = _scope()
        if scope is None:
            super().request(*args, **kwargs)  # type: ignore[misc]
            return
        if self.sock is not None:
            scope.watch(self.sock)
        release = scope.guard()
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        finally:
            release()

    def getresponse(self) -> Any:
        response = super().getresponse()  # type: ignore[misc]
        scope = _scope()
        if scope is not None:
            scope.answered = True
        return response


class _HTTPConnection(_WatchedConnection, HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


def _admit_all() -> Callable[[], None]:
    return _nothing


def _nothing() -> None:
    pass


class Pacing(Protocol):
    """Holds requests back (ratelimit.Pacer): ``paced`` waits for the turn of the
    path's endpoint, runs ``send`` and hears its status; ``close`` ends a wait."""

    def paced(self, path: str, send: Callable[[], requests.Response]) -> requests.Response: ...

    def close(self) -> None: ...


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter for one session: paced, bounded by one deadline per request
    (which the client ends with ``finish``), and closable from any thread."""

    def __init__(self) -> None:
        super().__init__()
        self.pacer: Pacing | None = None
        # Called as each attempt's request is about to be written (after its turn and
        # its connection); the release it returns once it is written or failed: the
        # poller's describe lane sends only while the latest listing holds the job,
        # and no listing is folded in meanwhile.
        self.guard: Callable[[], Callable[[], None]] = _admit_all
        self.closed = False
        self._lock = threading.Lock()
        self._scopes: set[RequestScope] = set()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if isinstance(manager, ProxyManager):   # not SOCKS: its pools are its own
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: bool | str = True, cert: Any = None,
             proxies: dict[str, str] | None = None) -> requests.Response:
        def send() -> requests.Response:
            return self._send(request, stream, timeout, verify, cert, proxies)
        if self.pacer is None:
            return send()
        return self.pacer.paced(request.path_url, send)

    def _send(self, request: requests.PreparedRequest, stream: bool, timeout: Any,
              verify: bool | str, cert: Any,
              proxies: dict[str, str] | None) -> requests.Response:
        seconds = timeout[1] if isinstance(timeout, tuple) else timeout
        deadline = time.monotonic() + (seconds if seconds is not None else 1e9)
        for attempt in (1, 2):
            scope = self._open(deadline)
            try:
                response = super().send(request, stream=stream, timeout=timeout,
                                        verify=verify, cert=cert, proxies=proxies)
            except requests.RequestException as exc:
                scope.end()
                if self.closed:
                    raise Interrupted("the session was closed") from None
                if scope.fired:
                    raise requests.Timeout("no complete answer within the timeout") \
                        from None
                # Only a kept-alive connection that failed before any answer came is
                # sent again, once, within what is left of the same deadline.
                if scope.fresh or scope.answered or attempt == 2 \
                        or isinstance(exc, requests.Timeout):
                    raise
                continue
            finally:
                _current.scope = None
            response.deadline_scope = scope     # type: ignore[attr-defined]
            if not stream:
                finish(response)
            return response
        raise AssertionError("unreachable")   # pragma: no cover

    def _open(self, deadline: float) -> RequestScope:
        scope = RequestScope(self, deadline)
        with self._lock:
            if self.closed:
                raise Interrupted("the session was closed")
            self._scopes.add(scope)
        _current.scope = scope
        return scope

    def _forget(self, scope: RequestScope) -> None:
        with self._lock:
            self._scopes.discard(scope)

    def close(self) -> None:
        """End every request in flight or waiting for its turn; refuse any more."""
        with self._lock:
            self.closed = True
            scopes = list(self._scopes)
        for scope in scopes:
            scope.interrupt()
        if self.pacer is not None:
            self.pacer.close()
        super().close()


def finish(response: requests.Response) -> bool:
    """End the response's request scope; True when its deadline had passed (the body
    read was cut short by the watchdog, not by the server)."""
    scope: RequestScope | None = getattr(response, "deadline_scope", None)
    if scope is None:
        return False
    scope.end()
    return scope.fired

"""Client-side pacing: stay under the servers' per-user, per-endpoint rate limits.

Zilliz Cloud allows about 20 requests per second per user and endpoint, and every
cluster polled with the same API key counts against the same allowance. So the
limit is kept per (host, API key, endpoint) in one ``TokenBucket`` that every
cluster using that host and key shares. A bucket holds a single token: requests
are spaced evenly, ``1/rate`` apart, so no one-second window ever holds more than
``rate`` of them, and a burst from many clusters is queued first come, first served
(so every cluster of a fleet moves through its pages at the same pace).

When the server still answers 429 (someone else uses the same key, or its limit is
lower than ours), the bucket halves its rate for everyone sharing it and recovers
linearly to the configured rate over ``RECOVERY_SECONDS``: the adaptive client-side
limiter cloud SDKs use, on top of the Retry-After wait the poller already honours.

``Pacer`` applies a bucket to every request of a session (through its
``deadline.DeadlineAdapter``), so every call (the listing and job details alike) is
paced without the API client knowing; closing the session interrupts a request waiting
for its token.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

import requests

from exporter.deadline import DeadlineAdapter, Interrupted

RECOVERY_SECONDS = 60.0


class Ticket:
    """A request's place in a bucket's queue; ``turn`` is set when it reaches the head."""

    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = threading.Event()


class TokenBucket:
    """Spaces the requests of everyone sharing it ``1/rate`` seconds apart.

    Requests queue first come, first served (``enqueue``); only the head of the queue
    waits for the clock, and ``release`` lets it go once ``1/rate`` has passed since the
    request before it went. The spacing is measured from when requests really went, so
    a thread that woke late never squeezes the next one against it, and a lowered rate
    applies at once to everyone already queued.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.configured = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._released = float("-inf")    # when the last request went
        self._floor = rate                 # rate right after the last 429
        self._throttled_at: float | None = None

    def rate(self, now: float | None = None) -> float:
        """Requests per second allowed at ``now``: lowered by a 429, recovering linearly."""
        if self._throttled_at is None:
            return self.configured
        now = self._clock() if now is None else now
        recovered = (now - self._throttled_at) / RECOVERY_SECONDS
        if recovered >= 1:
            return self.configured
        return self._floor + (self.configured - self._floor) * max(0.0, recovered)

    def reconfigure(self, rate: float) -> None:
        """A reload changed the configured rate."""
        with self._lock:
            self.configured = rate
            self._floor = min(self._floor, rate)

    def enqueue(self) -> Ticket:
        """Join the queue; the ticket's ``turn`` is set once it is at the head."""
        ticket = Ticket()
        with self._lock:
            self._queue.append(ticket)
            if self._queue[0] is ticket:
                ticket.turn.set()
        return ticket

    def release(self, ticket: Ticket) -> tuple[float, float]:
        """For the head of the queue: (now, 0) when it may go now, else (now, seconds left)."""
        with self._lock:
            now = self._clock()
            if not self._queue or self._queue[0] is not ticket:
                raise RuntimeError("only the head of the queue may be released")
            earliest = self._released + 1.0 / self.rate(now)
            if now < earliest:
                return now, earliest - now
            self._released = now
            self._pass_turn()
            return now, 0.0

    def leave(self, ticket: Ticket) -> None:
        """Give up a place (an interrupted wait); a no-op once released."""
        with self._lock:
            if ticket in self._queue:
                self._queue.remove(ticket)
                if self._queue and not self._queue[0].turn.is_set():
                    self._queue[0].turn.set()

    def _pass_turn(self) -> None:
        self._queue.popleft()
        if self._queue:
            self._queue[0].turn.set()

    def throttled(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` got a 429: halve the rate for everyone.

        Answers to requests sent before the last halving say nothing new about the
        lowered rate, so a burst of 429s halves it once, not once per request.
        """
        with self._lock:
            if self._throttled_at is not None and sent_at < self._throttled_at:
                return
            now = self._clock()
            self._floor = self.rate(now) / 2
            self._throttled_at = now


def endpoint_of(path: str) -> str:
    """The API endpoint a path (or URL) calls: its last segment (``list``, ``describe``)."""
    return urlsplit(path).path.rstrip("/").rsplit("/", 1)[-1]


class RateLimits:
    """Every bucket of the process, by (host, API key, endpoint).

    Clusters sharing a host and key share buckets; when they configure different
    rates, the lowest applies to all of them (``config.shared_rate_notes`` says so).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rates: dict[tuple[str, str], float] = {}
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}

    @staticmethod
    def _user(host: str, key: str) -> tuple[str, str]:
        """Buckets are keyed by a digest: no API key is held outside the session."""
        return host, hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def configure(self, users: Iterable[tuple[str, str, float]]) -> None:
        """Set the rate of each (host, key) from every cluster's (host, key, rate)."""
        rates: dict[tuple[str, str], float] = {}
        for host, key, rate in users:
            user = self._user(host, key)
            rates[user] = min(rate, rates.get(user, rate))
        with self._lock:
            self._rates = rates
            for (host, key, endpoint), bucket in list(self._buckets.items()):
                if (host, key) in rates:
                    bucket.reconfigure(rates[(host, key)])
                else:
                    del self._buckets[(host, key, endpoint)]

    def bucket(self, host: str, key: str, endpoint: str, rate: float) -> TokenBucket:
        """The shared bucket; ``rate`` is used only when no configure() named the user."""
        user = self._user(host, key)
        with self._lock:
            found = self._buckets.get((*user, endpoint))
            if found is None:
                found = self._buckets[(*user, endpoint)] = TokenBucket(
                    self._rates.get(user, rate), self._clock)
            return found

    def buckets(self) -> Mapping[tuple[str, str, str], TokenBucket]:
        with self._lock:
            return dict(self._buckets)


class Pacer:
    """Waits for a token of the (host, key, endpoint) bucket before each request of a
    session (``deadline.DeadlineAdapter.pacer``).

    ``waited`` is the cumulative time this session's requests spent waiting, for
    ``zilliz_import_rate_limit_wait_seconds_total``.
    """

    def __init__(self, limits: RateLimits, host: str, key: str, rate: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
        self._limits = limits
        self._user = (host, key)
        self._rate = rate
        self._clock = clock
        self._closed = threading.Event()
        self._sleep = sleep or self._closed.wait
        self._lock = threading.Lock()
        self._ticket: Ticket | None = None     # the request waiting now, if any
        self._buckets: dict[str, TokenBucket] = {}
        self.waited = 0.0

    def paced(self, path: str,
              send: Callable[[], requests.Response]) -> requests.Response:
        """Wait for the turn of the endpoint ``path`` calls, then ``send``; a 429 slows
        the bucket down."""
        endpoint = endpoint_of(path)
        bucket = self._buckets.get(endpoint)
        if bucket is None:      # kept: a reload reconfigures a bucket in place
            bucket = self._buckets[endpoint] = self._limits.bucket(*self._user, endpoint,
                                                                   self._rate)
        started = self._clock()
        ticket = self._ticket = bucket.enqueue()
        try:
            while True:
                # turn is set at the head of the queue, or by close(), which sets _closed
                # first: checked once the ticket is known, a close() racing the enqueue
                # is never missed
                if not self._closed.is_set():
                    ticket.turn.wait()
                if self._closed.is_set():
                    raise Interrupted("stopped while waiting for the rate limiter")
                sent, delay = bucket.release(ticket)
                if delay <= 0:
                    break
                if self._sleep(delay):
                    raise Interrupted("stopped while waiting for the rate limiter")
        finally:
            bucket.leave(ticket)
            paced = max(0.0, self._clock() - started)
            with self._lock:
                self.waited += paced
        response = send()
        if response.status_code == 429:
            bucket.throttled(sent)
        return response

    def close(self) -> None:
        self._closed.set()
        if self._ticket is not None:
            self._ticket.turn.set()           # wake a request queued behind others


def pace(session: requests.Session, pacer: Pacer) -> Pacer:
    """Pace every request of ``session`` (made by ``client.make_session``) by ``pacer``."""
    for adapter in session.adapters.values():
        if isinstance(adapter, DeadlineAdapter):
            adapter.pacer = pacer
    return pacer

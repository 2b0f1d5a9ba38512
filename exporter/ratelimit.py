"""Client-side pacing: stay under the servers' per-user, per-endpoint rate limits.

Zilliz Cloud allows about 20 requests per second per user and endpoint, and every
cluster polled with the same API key counts against the same allowance. So the
limit is kept per (host, API key, endpoint) in one ``TokenBucket`` that every
cluster using that host and key shares. A bucket holds a single token: requests
are spaced evenly, ``1/rate`` apart, so no one-second window ever holds more than
``rate`` of them, and a burst from many clusters is queued first come, first served.

When the server still answers 429 (someone else uses the same key, or its limit is
lower than ours), the bucket halves its rate for everyone sharing it and recovers
linearly to the configured rate over ``RECOVERY_SECONDS``: the adaptive client-side
limiter cloud SDKs use, on top of the Retry-After wait the poller already honours.

``PacedAdapter`` applies a bucket to every request of a ``requests.Session``, so
every call (the listing and job details alike) is paced without the API client
knowing; closing the session interrupts a request waiting for its token.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

RECOVERY_SECONDS = 60.0


class Interrupted(requests.RequestException):
    """The session was closed while a request waited for its token."""


class TokenBucket:
    """Spaces the requests of everyone sharing it ``1/rate`` seconds apart.

    ``reserve`` hands out the next free slot (first come, first served) and says how
    long to wait for it; the caller sleeps outside the lock.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.configured = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0                   # monotonic time of the next free slot
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

    def reserve(self) -> tuple[float, float]:
        """(slot, seconds to wait for it): the next request may go at ``slot``."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate(slot)
            return slot, slot - now

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
            self._next = max(self._next, now + 1.0 / self._floor)


def endpoint_of(url: str) -> str:
    """The API endpoint a URL calls: its last path segment (``list``, ``describe``...)."""
    return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]


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


class PacedAdapter(HTTPAdapter):
    """Waits for a token of the (host, key, endpoint) bucket before each request.

    ``waited`` is the cumulative time this session's requests spent waiting, for
    ``zilliz_import_rate_limit_wait_seconds_total``.
    """

    def __init__(self, limits: RateLimits, host: str, key: str, rate: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None) -> None:
        super().__init__()
        self._limits = limits
        self._user = (host, key)
        self._rate = rate
        self._clock = clock
        self._closed = threading.Event()
        self._sleep = sleep or self._closed.wait
        self._lock = threading.Lock()
        self.waited = 0.0

    def send(self, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        bucket = self._limits.bucket(*self._user, endpoint_of(request.url or ""), self._rate)
        started = self._clock()
        slot, delay = bucket.reserve()
        interrupted = delay > 0 and self._sleep(delay)
        with self._lock:
            self.waited += max(0.0, self._clock() - started)
        if interrupted or self._closed.is_set():
            raise Interrupted("stopped while waiting for the rate limiter")
        response = super().send(request, *args, **kwargs)
        if response.status_code == 429:
            bucket.throttled(slot)
        return response

    def close(self) -> None:
        self._closed.set()
        super().close()


def pace(session: requests.Session, limits: RateLimits, host: str, key: str,
         rate: float) -> PacedAdapter:
    """Mount a paced adapter on every scheme of ``session``; returns it."""
    adapter = PacedAdapter(limits, host, key, rate)
    for prefix in ("https://", "http://"):
        session.mount(prefix, adapter)
    return adapter

"""Paging and retries: one listing (of jobs, or of a key's clusters) read page by page
from page 1 without trusting the server to page well, each request retried after
timeouts, connection errors, 429 and 5xx with exponential backoff and full jitter.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Callable, Protocol, Sequence, TypeVar

import requests

from exporter.answers import ListingPage
from exporter.client import list_import_jobs
from exporter.config import ClusterConfig, PollSettings
from exporter.errors import PaginationFailure, PollFailure
from exporter.jobs import Listing
from exporter.logs import FieldsAdapter, bind

log = logging.getLogger("exporter.paging")

MAX_BACKOFF = 30.0

T = TypeVar("T")


class Stopped(Exception):
    """The poller was told to stop while it waited."""


def backoff_delay(attempt: int, retry_after: float | None, cap: float,
                  rng: random.Random) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins if longer."""
    delay = rng.uniform(0, min(MAX_BACKOFF, 0.5 * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def with_retries(call: Callable[[], T], settings: PollSettings, *,
                 wait: Callable[[float], bool], rng: random.Random,
                 logger: FieldsAdapter) -> T:
    """One API call, retried after timeouts, connection errors, 429 and 5xx.

    Backs off exponentially with jitter (Retry-After honoured); ``wait`` sleeps and
    returns True when the poller must stop, which raises Stopped.
    """
    attempt = 0
    while True:
        try:
            return call()
        except PollFailure as failure:
            if not failure.retryable or attempt >= settings.retries:
                raise
            delay = backoff_delay(attempt, failure.retry_after,
                                  max(settings.interval, settings.timeout), rng)
            logger.debug("retrying request", extra={"fields": {
                "reason": failure.reason, "delay_seconds": round(delay, 3)}})
            attempt += 1
            if wait(delay):
                raise Stopped() from None


class Page(Protocol):
    """One page of a listing as the API client returns it."""

    @property
    def records(self) -> Sequence[object]: ...

    @property
    def count(self) -> int | None: ...


P = TypeVar("P", bound=Page)


def page_through(fetch: Callable[[int], P], add: Callable[[P], int], held: Callable[[], int],
                 *, page_size: int, max_pages: int, noun: str = "jobs") -> int:
    """Page through a listing from page 1 without trusting the server to page well;
    returns how many pages it took, or raises PollFailure.

    ``fetch`` gets a page, ``add`` takes it in and says how many of its ids were new,
    ``held`` says how many ids are in. Stops on a short or empty page, on a reached
    total, on a page that brings no new id (servers that ignore paging), and fails
    past max_pages. A first page holding more than were asked for is a server that
    ignores paging (Milvus): it is the whole listing, and no second request is sent;
    a later page doing so is refused (pagination).
    """
    total: int | None = None
    page = 0
    while True:
        page += 1
        if page > max_pages:
            raise PaginationFailure(f"listing did not end within max_pages={max_pages} "
                                    f"pages ({held()} {noun} so far)")
        result = fetch(page)
        held_here = len(result.records)
        oversized = held_here > page_size
        if oversized and page > 1:
            raise PaginationFailure(f"page {page} held {held_here} {noun}, more than the "
                                    f"page_size={page_size} asked for")
        new_ids = add(result)
        if oversized:           # page 1 of a server that ignores paging: the whole listing
            return page
        if result.count is not None and result.count > held_here:
            total = result.count        # a count larger than its page is a total
        if not held_here or held_here < page_size:
            return page
        if total is not None and held() >= total:
            return page
        if new_ids == 0:
            return page


def fetch_listing(session: requests.Session, cluster: ClusterConfig, *,
                  observe: Callable[[str, str], None] = lambda endpoint, code: None,
                  wait: Callable[[float], bool] | None = None,
                  rng: random.Random | None = None) -> Listing:
    """Page through one listing (``page_through``); raise PollFailure (never return
    half a listing). ``wait`` sleeps between retries and returns True when the poller
    must stop.
    """
    settings = cluster.settings
    chosen_rng = rng or random.Random()
    chosen_wait = wait or threading.Event().wait
    listing = Listing()
    cluster_log = bind(log, cluster_name=cluster.name)

    def fetch(page: int) -> ListingPage:
        return with_retries(lambda: list_import_jobs(session, cluster, page, observe),
                            settings, wait=chosen_wait, rng=chosen_rng,
                            logger=cluster_log.bind(page=page))
    listing.pages = page_through(fetch, lambda page: listing.extend(page.records, page.reasons),
                                 lambda: len(listing), page_size=settings.page_size,
                                 max_pages=settings.max_pages)
    return listing

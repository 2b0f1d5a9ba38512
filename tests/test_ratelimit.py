"""The client-side rate limiter: bucket arithmetic on a fake clock, then the real thing
against the simulator enforcing Zilliz's per-key, per-endpoint limit."""

from __future__ import annotations

import threading

import pytest

from conftest import FakeClock
from exporter.client import make_session
from exporter.collector import ImportCollector
from exporter.config import ClusterConfig, PollSettings
from exporter.board import SnapshotBoard
from exporter.poller import PollerGroup, next_poll_delay
from exporter.ratelimit import (
    RECOVERY_SECONDS, Interrupted, Pacer, RateLimits, TokenBucket, endpoint_of, pace,
)
from exporter.simulator import Simulator, busiest_window
from prometheus_client import CollectorRegistry


def take(bucket: TokenBucket, clock: FakeClock) -> float:
    """One request through the bucket on a fake clock: the time it went."""
    ticket = bucket.enqueue()
    assert ticket.turn.is_set()             # alone in the queue: at its head at once
    sent, delay = bucket.release(ticket)
    if delay > 0:
        clock.advance(delay)
        sent, delay = bucket.release(ticket)
    assert delay == 0
    return sent


def test_one_token_spaces_requests_evenly_and_no_second_holds_more_than_the_rate() -> None:
    clock = FakeClock(100.0)
    bucket = TokenBucket(18, clock)
    sent = [take(bucket, clock) for _ in range(100)]
    gaps = {round(b - a, 9) for a, b in zip(sent, sent[1:])}
    assert gaps == {round(1 / 18, 9)} and sent[0] == 100.0
    assert busiest_window(sent) == 18
    # a bucket left idle does not save up tokens for a burst
    clock.advance(60)
    later = [take(bucket, clock) for _ in range(3)]
    assert later[1] - later[0] == pytest.approx(1 / 18)
    assert later[2] - later[1] == pytest.approx(1 / 18)


def test_requests_queue_first_come_first_served_and_only_the_head_waits() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(10, clock)
    first, second, third = bucket.enqueue(), bucket.enqueue(), bucket.enqueue()
    assert [t.turn.is_set() for t in (first, second, third)] == [True, False, False]
    with pytest.raises(RuntimeError):
        bucket.release(second)
    assert bucket.release(first) == (0.0, 0.0)
    assert second.turn.is_set() and not third.turn.is_set()
    clock.advance(0.13)                # the second request's thread woke 30 ms late...
    assert bucket.release(second) == (0.13, 0.0)
    clock.advance(0.07)                # ...so the third goes 0.1 s after it, not at 0.2
    now, wait = bucket.release(third)
    assert now == pytest.approx(0.2) and wait == pytest.approx(0.03)
    # an interrupted request gives up its place, and the one behind it moves up
    fourth, fifth = bucket.enqueue(), bucket.enqueue()
    bucket.leave(third)
    assert fourth.turn.is_set() and not fifth.turn.is_set()


def test_a_429_halves_the_rate_which_recovers_linearly_over_a_minute() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(10, clock)
    sent = take(bucket, clock)
    clock.advance(1)
    bucket.throttled(sent)
    assert bucket.rate() == 5
    clock.advance(RECOVERY_SECONDS / 2)
    assert bucket.rate() == pytest.approx(7.5)
    clock.advance(RECOVERY_SECONDS / 2)
    assert bucket.rate() == 10
    # the next request after a 429 is spaced at the halved rate
    bucket = TokenBucket(10, clock)
    first = take(bucket, clock)
    bucket.throttled(first)
    assert take(bucket, clock) - first == pytest.approx(1 / 5)


def test_a_burst_of_429s_for_requests_sent_before_the_halving_halves_once() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(16, clock)
    sent = [take(bucket, clock) for _ in range(4)]
    clock.advance(0.5)
    for at in sent:
        bucket.throttled(at)
    assert bucket.rate() == 8
    after = take(bucket, clock)
    bucket.throttled(after)         # sent at the lowered rate and still refused: halve again
    assert bucket.rate() == pytest.approx(4, rel=0.01)


def test_buckets_are_shared_by_host_and_key_per_endpoint_and_the_lowest_rate_wins() -> None:
    limits = RateLimits(FakeClock(0.0))
    limits.configure([("h", "key", 18), ("h", "key", 5), ("h", "other", 7)])
    listing = limits.bucket("h", "key", "list", 18)
    assert limits.bucket("h", "key", "list", 18) is listing and listing.configured == 5
    assert limits.bucket("h", "key", "describe", 18) is not listing
    assert limits.bucket("h", "other", "list", 18).configured == 7
    assert limits.bucket("h2", "key", "list", 3).configured == 3
    # a reload raises the rate of live buckets and drops those nobody uses any more
    limits.configure([("h", "key", 12)])
    assert limits.bucket("h", "key", "list", 18) is listing and listing.configured == 12
    assert all("other" not in key for key in limits.buckets())
    assert not any("key" in part for key in limits.buckets() for part in key)  # digests only


def test_endpoint_is_the_last_path_segment() -> None:
    assert endpoint_of("https://x/v1/vector/collections/import/list?clusterId=1") == "list"
    assert endpoint_of("http://x/milvus/m/v2/vectordb/jobs/import/get_progress") == \
        "get_progress"


def cluster_on(sim: Simulator, name: str, **settings: object) -> ClusterConfig:
    c = sim.clusters[name]
    return ClusterConfig(name=name, url=sim.url_for(name),
                         api="v1" if c.flavour == "v1" else "v2", cluster_id=c.cluster_id,
                         api_key=c.api_key,
                         settings=PollSettings(**settings))  # type: ignore[arg-type]


def test_paced_session_waits_on_a_fake_clock_and_counts_the_wait(simulator) -> None:
    simulator.add_cluster("c", "v2").add_jobs(3)
    cluster = cluster_on(simulator, "c")
    clock = FakeClock(0.0)
    sleeps: list[float] = []

    def sleep(seconds: float) -> bool:
        sleeps.append(seconds)
        clock.advance(seconds)
        return False
    session = make_session(cluster)
    pacer = pace(session, Pacer(RateLimits(clock), cluster.host, cluster.api_key, 4, clock,
                                sleep))
    for _ in range(5):
        reply = session.post(cluster.url + "/v2/vectordb/jobs/import/list", timeout=5,
                             json={"clusterId": cluster.cluster_id})
        assert reply.status_code == 200
    assert sleeps == [0.25] * 4 and pacer.waited == pytest.approx(1.0)
    assert simulator.clusters["c"].requests == 5


def test_closing_the_session_interrupts_a_request_waiting_for_its_token(simulator) -> None:
    simulator.add_cluster("c", "v2")
    cluster = cluster_on(simulator, "c")
    session = make_session(cluster)
    pace(session, Pacer(RateLimits(), cluster.host, cluster.api_key, 0.01))   # 100 s apart
    path = cluster.url + "/v2/vectordb/jobs/import/list"
    session.post(path, json={}, timeout=5)
    outcome: list[BaseException] = []

    def second() -> None:
        try:
            session.post(path, json={}, timeout=5)
        except OSError as exc:
            outcome.append(exc)
    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.2)
    session.close()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], Interrupted)
    assert len(simulator.log) == 1          # the waiting request never went


def fleet(sim: Simulator, clusters: int, jobs: int, **settings: object):
    """Clusters sharing one API key, polled concurrently once by a real PollerGroup.

    Job details are off: these tests count list requests (describes have a bucket of
    their own, tested in test_describes_take_from_their_own_bucket).
    """
    settings.setdefault("max_describes_per_poll", 0)
    for i in range(clusters):
        sim.add_cluster(f"c{i}", "v2", api_key="shared-key").add_jobs(jobs, "docs", "importing")
    board = SnapshotBoard()
    group = PollerGroup(board)
    group.apply(tuple(cluster_on(sim, f"c{i}", **settings) for i in range(clusters)),
                start=False)
    return board, group


def test_a_fleet_sharing_one_key_stays_under_the_servers_limit(simulator) -> None:
    """10 clusters x 3 pages on one key at 18/s against Zilliz's 20/s: nothing throttled."""
    simulator.rate_limit = 20
    board, group = fleet(simulator, 10, 250, page_size=100, requests_per_second=18,
                         retries=0)
    snapshots = group.poll_all_once()
    assert all(s.up and s.jobs is not None and s.jobs.total == 250 for s in snapshots)
    assert simulator.throttled() == 0 and len(simulator.log) == 30
    assert simulator.busiest_second() <= 20
    # 30 requests 1/18 s apart take at least 29/18 s, and the waiting shows in the metric
    registry = CollectorRegistry()
    registry.register(ImportCollector(board))
    waited = sum(registry.get_sample_value("zilliz_import_rate_limit_wait_seconds_total",
                                           {"cluster_name": f"c{i}"}) or 0
                 for i in range(10))
    assert waited > 10      # every cluster queued behind the others


@pytest.mark.parametrize("retry_after", ["1", None])
def test_throttled_by_a_lower_server_limit_the_fleet_backs_off_and_completes(
        simulator, retry_after) -> None:
    """Server limit 10/s, ours 100/s: 429s halve the shared rate; every listing completes."""
    simulator.rate_limit = 10
    simulator.rate_limit_retry_after = retry_after
    board, group = fleet(simulator, 4, 150, page_size=50, requests_per_second=100, retries=4)
    snapshots = group.poll_all_once()
    assert all(s.up and s.jobs is not None and s.jobs.total == 150 for s in snapshots), \
        [s.last_error for s in snapshots]
    throttled = simulator.throttled()
    print(f"{throttled} of {len(simulator.log)} requests throttled")
    assert 0 < throttled < len(simulator.log) / 2
    bucket = next(iter(group.limits.buckets().values()))
    assert bucket.rate() < 100          # halved for everyone sharing the key


def test_the_next_poll_starts_interval_after_the_last_began_or_at_once_when_late() -> None:
    """Arithmetic of the schedule; one thread per cluster runs it, so a late poll is
    followed by the next, never overlapped by it."""
    assert next_poll_delay(30, 12) == 18
    assert next_poll_delay(30, 45) == 0 and next_poll_delay(30, 30) == 0


def test_describes_take_from_their_own_bucket(simulator) -> None:
    """The list and describe endpoints are limited separately, as Zilliz counts them."""
    simulator.add_cluster("c", "v2").add_jobs(4, "docs", "importing")
    cluster = cluster_on(simulator, "c", max_describes_per_poll=4, requests_per_second=1000)
    group = PollerGroup(SnapshotBoard())
    group.apply((cluster,), start=False)
    group.poll_all_once()
    endpoints = {endpoint for _, _, endpoint in group.limits.buckets()}
    assert endpoints == {"list", "describe"}
    assert {r.endpoint for r in simulator.log} == {"list", "describe"}


def test_a_session_closed_before_its_request_queued_never_waits_its_turn() -> None:
    """close() racing the enqueue: the request behind another must still stop at once."""
    limits = RateLimits()
    head = limits.bucket("h", "k", "list", 1.0).enqueue()    # someone else is first
    pacer = Pacer(limits, "h", "k", 1.0)
    pacer.close()
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            pacer.paced("/v2/vectordb/jobs/import/list", lambda: pytest.fail("sent"))
        except OSError as exc:
            outcome.append(exc)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome[0], Interrupted)
    assert head.turn.is_set()       # and the queue it left behind is intact

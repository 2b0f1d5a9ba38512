"""MemoryReturner: freed memory goes back on a timer, only when resident memory grew."""

from __future__ import annotations

from conftest import FakeClock
from exporter.memory import MemoryReturner, resident_bytes

MIB = 1024 * 1024


class Process:
    """A resident set size that a release brings down to what is really in use."""

    def __init__(self, rss: int, in_use: int) -> None:
        self.rss_now, self.in_use, self.releases = rss, in_use, 0

    def rss(self) -> int:
        return self.rss_now

    def release(self) -> None:
        self.releases += 1
        self.rss_now = self.in_use


def test_releases_on_the_timer_only_when_memory_grew() -> None:
    clock, process = FakeClock(), Process(40 * MIB, 40 * MIB)
    returner = MemoryReturner(every=5, grown_bytes=4 * MIB, rss=process.rss,
                              release=process.release, clock=clock)
    process.rss_now = 70 * MIB                 # a burst of connections came and went
    assert not returner.tick()                 # not yet: the timer
    clock.advance(5)
    assert returner.tick() and process.rss_now == 40 * MIB
    clock.advance(5)
    assert not returner.tick()                 # nothing grew: nothing to do
    process.in_use = process.rss_now = 60 * MIB      # memory really in use
    clock.advance(5)
    assert returner.tick() and process.releases == 2
    clock.advance(5)
    assert not returner.tick()                 # not trimmed again and again
    process.rss_now = 63 * MIB
    clock.advance(5)
    assert not returner.tick() and process.releases == 2   # under the growth threshold


def test_resident_bytes_reads_this_process() -> None:
    assert resident_bytes() > 1 * MIB

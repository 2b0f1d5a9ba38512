"""MemoryReturner: freed memory goes back on a timer, after any burst, and a quiet
process is left alone."""

from __future__ import annotations

from conftest import FakeClock
from exporter.memory import MemoryReturner, free_heap_bytes, resident_bytes

MIB = 1024 * 1024


class Heap:
    """malloc's view: memory in use, and memory freed but held; a release hands the held
    memory back but for ``stuck`` bytes of free chunks between live ones."""

    def __init__(self, in_use: int, held: int = 0, stuck: int = 1 * MIB) -> None:
        self.in_use, self.held, self.stuck, self.releases = in_use, held, stuck, 0

    def free(self) -> int:
        return self.held

    def rss(self) -> int:
        return self.in_use + self.held

    def release(self) -> None:
        self.releases += 1
        self.held = min(self.held, self.stuck)

    def returner(self, clock: FakeClock, **kwargs: object) -> MemoryReturner:
        return MemoryReturner(every=5, grown_bytes=4 * MIB, free=self.free, rss=self.rss,
                              release=self.release, clock=clock, **kwargs)  # type: ignore


def test_memory_freed_after_a_burst_goes_back_even_when_a_release_came_at_its_peak() -> None:
    """The issue-19 trial: connections held open (in use), a look at that peak, then they
    close. Judged by resident memory, the peak set the floor and nothing went back."""
    clock, heap = FakeClock(), Heap(in_use=29 * MIB)
    returner = heap.returner(clock)
    heap.in_use = 58 * MIB                     # 500 half-open handshakes, held
    clock.advance(5)
    assert not returner.tick()                 # nothing freed: nothing to hand back
    heap.in_use, heap.held = 29 * MIB, 29 * MIB       # they closed
    assert not returner.tick()                 # not yet: the timer
    clock.advance(5)
    assert returner.tick() and heap.rss() == 30 * MIB
    for burst in range(3):                     # bursts in a row do not ratchet
        heap.held += 29 * MIB
        clock.advance(5)
        assert returner.tick() and heap.rss() == 30 * MIB
    assert heap.releases == 4


def test_a_quiet_process_and_memory_really_in_use_are_left_alone() -> None:
    clock, heap = FakeClock(), Heap(in_use=40 * MIB, held=3 * MIB)
    returner = heap.returner(clock)
    for _ in range(10):
        clock.advance(5)
        assert not returner.tick()             # nothing changed: one look, no release
    heap.in_use += 100 * MIB                   # a larger history, really in use
    clock.advance(5)
    assert not returner.tick()
    heap.held += 3 * MIB                       # under the threshold
    clock.advance(5)
    assert not returner.tick() and heap.releases == 0


def test_without_glibc_resident_growth_is_the_sign() -> None:
    clock, heap = FakeClock(), Heap(in_use=40 * MIB)
    returner = MemoryReturner(every=5, grown_bytes=4 * MIB, free=lambda: None, rss=heap.rss,
                              release=heap.release, clock=clock)
    heap.held = 30 * MIB
    clock.advance(5)
    assert returner.tick() and heap.rss() == 41 * MIB


def test_this_process_is_read() -> None:
    assert resident_bytes() > 1 * MIB
    free = free_heap_bytes()
    assert free is None or free >= 0

"""/metrics bodies: each cluster's series encoded once when it publishes, and joined.

A scrape's body is the registry's families, encoded (text or OpenMetrics, gzipped or
not) and kept per board change, reload and second, so fifty scrapers cost one render.
With the import collector's pieces (``ImportCollector.parts``: one per family and
cluster, the same objects until that cluster publishes again), what a render encodes
is only what changed: every other piece's bytes, and its gzip, come from the last
render. A body is its pieces' bytes joined under one header per family; its gzip is
their deflate streams joined (each ends on a byte boundary, so they make one stream)
with a CRC over the whole. A scrape never waits for the rendering of a cluster that
did not change.

A series that cannot be encoded is left out and counted in
``zilliz_import_render_errors_total``; the rest of the scrape is still served.
"""

from __future__ import annotations

import copy
import logging
import struct
import threading
import time
import zlib
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.collector import RENDER_ERRORS, ImportCollector
from exporter.board import SnapshotBoard

log = logging.getLogger("exporter.web")

# Distinct encodings (content types, gzip or not) kept per render.
_MAX_ENCODINGS = 8
_EOF = b"# EOF\n"
# gzip's header (no name, no time, fastest) and the last, empty deflate block.
_GZIP_HEAD = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"
_LAST_BLOCK = zlib.compressobj(1, zlib.DEFLATED, -15).flush()

Encoder = Callable[[Collector], bytes]


class FamilyList(Collector):
    """Some metric families in the shape the encoders take (anything with collect())."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


class _Segment:
    """Encoded bytes and, made when first asked for, their deflate stream."""

    __slots__ = ("data", "errors", "_deflated")

    def __init__(self, data: bytes, errors: int = 0) -> None:
        self.data = data
        self.errors = errors      # series left out of it: counted on every render
        self._deflated: bytes | None = None

    def deflated(self) -> bytes:
        if self._deflated is None:
            packer = zlib.compressobj(1, zlib.DEFLATED, -15)
            self._deflated = packer.compress(self.data) + packer.flush(zlib.Z_SYNC_FLUSH)
        return self._deflated


class ExpositionCache:
    """/metrics bodies, rendered once per board change and second, per encoding; with
    ``imports`` (not also in ``registry``), a render encodes only the pieces that
    changed. Rendering holds a lock, so scrapers arriving together wait for one render
    instead of each doing it; none of them ever waits on a poll."""

    def __init__(self, registry: CollectorRegistry, board: SnapshotBoard,
                 clock: Callable[[], float] = time.time, enabled: bool = True,
                 generation: Callable[[], int] = lambda: 0,
                 imports: ImportCollector | None = None) -> None:
        """``generation`` changes with what the board does not hold (a reload, by
        SIGHUP, auto-reload or /-/reload), so that shows at the next scrape too."""
        self._registry = registry
        self._board = board
        self._clock = clock
        self._enabled = enabled
        self._generation = generation
        self._imports = imports
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._bodies: dict[tuple[str, bool], bytes] = {}
        self._segments: dict[str, list[_Segment]] = {}     # of this key's renders
        # Encoded pieces by (content type, id of the piece); the piece is kept with them
        # so its id is not reused. Pruned to what the last render used.
        self._pieces: dict[tuple[str, int], tuple[Metric, _Segment]] = {}
        self._headers: dict[tuple[str, str], _Segment] = {}
        self._recent: list[str] = []      # content types, the one rendered last at the end
        self.render_errors = 0       # series left out, cumulative
        self._counted: tuple[int, int, int] | None = None    # key whose errors are in
        self._logged: set[str] = set()    # metrics and failures already logged

    def body(self, encoder: Encoder, content_type: str, gzipped: bool) -> bytes:
        if not self._enabled:
            with self._lock:
                return self._encode(encoder, content_type, gzipped, {}, {})
        key = (self._board.version, self._generation(), int(self._clock()))
        with self._lock:
            if key != self._key:
                self._key, self._bodies, self._segments = key, {}, {}
            return self._encode(encoder, content_type, gzipped, self._bodies,
                                self._segments)

    def _encode(self, encoder: Encoder, content_type: str, gzipped: bool,
                bodies: dict[tuple[str, bool], bytes],
                segments: dict[str, list[_Segment]]) -> bytes:
        """From ``bodies`` or rendered into it; the gzipped body joins the deflate
        streams of the plain body's segments (one render serves both)."""
        body = bodies.get((content_type, gzipped))
        if body is None:
            if content_type not in segments:
                segments[content_type] = self._render(encoder, content_type)
            parts = segments[content_type]
            plain = bodies.get((content_type, False))
            if plain is None:
                plain = b"".join(part.data for part in parts)
            body = plain
            if gzipped:
                body = b"".join((_GZIP_HEAD, *(part.deflated() for part in parts),
                                 _LAST_BLOCK, struct.pack("<II", zlib.crc32(plain),
                                                          len(plain) & 0xFFFFFFFF)))
            if len(bodies) < _MAX_ENCODINGS:
                bodies[(content_type, gzipped)] = body
        return body

    def families(self, encoder: Encoder) -> list[Metric]:
        """What a scrape serves, as families: every series that ``encoder`` can encode
        (the rest left out and counted), then the render-errors counter. For --once,
        which writes through prometheus_client.write_to_textfile."""
        with self._lock:
            self._errors = 0
            kept = [self._encoded(encoder, family)[0] for family in self._families()]
            self._count_errors()
            return [*kept, self._render_errors_family()]

    def _families(self) -> Iterator[Metric]:
        try:
            yield from self._registry.collect()
            if self._imports is not None:
                yield from self._imports.parts()
        except Exception:
            self._errors += 1
            if "collect" not in self._logged:      # once, not every second
                self._logged.add("collect")
                log.error("a collector failed; its series are left out of scrapes",
                          exc_info=True)

    def _render(self, encoder: Encoder, content_type: str) -> list[_Segment]:
        """The body's segments: each family's header once, then its pieces' series, each
        piece encoded once for as long as it lives."""
        self._errors = 0
        segments: list[_Segment] = []
        kept: dict[tuple[str, int], tuple[Metric, _Segment]] = {}
        last_name = None

        def add(family: Metric, encoded: bytes | None = None) -> None:
            nonlocal last_name
            try:
                header = self._header(encoder, content_type, family)
            except Exception:        # not the samples: the family itself
                self._errors += 1
                return
            if family.name != last_name:
                segments.append(header)
                last_name = family.name
            key = (content_type, id(family))
            found = self._pieces.get(key)
            if found is None or found[0] is not family:
                before = self._errors
                data = encoded if encoded is not None else self._encoded(encoder, family)[1]
                found = (family, _Segment(data[len(header.data):], self._errors - before))
                self._errors = before
            self._errors += found[1].errors
            kept[key] = found
            segments.append(found[1])
        for family in self._families():
            add(family)
        self._keep(content_type, kept)
        self._count_errors()
        counter = self._render_errors_family()
        add(counter, self._one(encoder, counter))
        self._pieces.pop((content_type, id(counter)), None)
        if encoder(FamilyList([])).endswith(_EOF):
            segments.append(_Segment(_EOF))
        return segments

    def _keep(self, content_type: str,
              kept: dict[tuple[str, int], tuple[Metric, _Segment]]) -> None:
        """The pieces this render used replace the content type's; only the
        _MAX_ENCODINGS content types used last keep pieces and headers (a client can
        name a new one with every scrape: its Accept header's version)."""
        if content_type in self._recent:
            self._recent.remove(content_type)
        self._recent.append(content_type)
        recent = set(self._recent[-_MAX_ENCODINGS:])
        self._recent = self._recent[-_MAX_ENCODINGS:]
        self._pieces = {key: piece for key, piece in self._pieces.items()
                        if key[0] != content_type and key[0] in recent} | kept
        self._headers = {key: header for key, header in self._headers.items()
                         if key[0] in recent}

    def _render_errors_family(self) -> Metric:
        counter = RENDER_ERRORS.new()
        RENDER_ERRORS.fill(counter, (), self.render_errors)
        return counter

    def _count_errors(self) -> None:
        """Once per render of the board: the other encodings of the same key leave out
        the same series, and are not more scrapes."""
        if self._key is None or self._key != self._counted:
            self.render_errors += self._errors
            self._counted = self._key

    def _header(self, encoder: Encoder, content_type: str, family: Metric) -> _Segment:
        header = self._headers.get((content_type, family.name))
        if header is None:
            empty = copy.copy(family)
            empty.samples = []
            header = self._headers[(content_type, family.name)] = _Segment(
                self._one(encoder, empty))
        return header

    def _encoded(self, encoder: Encoder, family: Metric) -> tuple[Metric, bytes]:
        """``family`` and its encoding; one that fails is encoded again sample by
        sample, leaving out (and counting) only the samples that cannot be."""
        try:
            return family, self._one(encoder, family)
        except Exception:
            pass
        kept = []
        for sample in family.samples:
            probe = copy.copy(family)
            probe.samples = [sample]
            try:
                self._one(encoder, probe)
            except Exception:
                self._errors += 1
                continue
            kept.append(sample)
        if family.name not in self._logged:      # once per metric, not per scrape
            self._logged.add(family.name)
            log.warning("series left out of scrapes: they cannot be encoded",
                        extra={"fields": {"metric": family.name,
                                          "left_out": len(family.samples) - len(kept)}})
        family = copy.copy(family)
        family.samples = kept
        return family, self._one(encoder, family)

    @staticmethod
    def _one(encoder: Encoder, family: Metric) -> bytes:
        encoded = encoder(FamilyList([family]))
        return encoded[:-len(_EOF)] if encoded.endswith(_EOF) else encoded

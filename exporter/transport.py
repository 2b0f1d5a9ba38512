"""One keep-alive HTTP/1.1 connection to a cluster's API, on the standard library.

The API calls are small and many (a page of the listing, the details of one job), so
what each one costs the client matters: ``requests`` spent about 0.45 ms of CPU per
request on settings, cookies, hooks and redirects this exporter never uses, as much as
parsing a whole 100-job page, and ``http.client.HTTPConnection`` 0.1 ms, half of it
composing and checking the same headers again. Here a request's head is written from
parts made once per session and its answer parsed by ``http.client.HTTPResponse``
(tests/bench: 50 describes add about 15% to a 10,000-job poll, against 35% with
``requests``, and the poll itself costs 30% less).

What the exporter needs around that is here too: keep-alive, with one transparent
retry when the server had closed an idle connection; TLS from the cluster's settings;
one deadline for the whole request, from connecting to the answer's last byte (each
socket operation gets what is left of it, and ``deadline.WATCHDOG`` ends an answer that
trickles in past it; resolving the name and trying a host's further addresses are
bounded only per address, as in ``socket.create_connection``); a cap on the body's
size, after gunzip, so a small bomb is no way around it; pacing by ``ratelimit`` before
each request; and ``close()`` from another thread, which ends a request in flight or
waiting its turn.

Failures are the standard library's: OSError (``TimeoutError`` past the deadline,
``ssl.SSLError``, ``Interrupted`` once closed), ``http.client.HTTPException`` for a
malformed answer, and ``AnswerTooLarge``/``BadEncoding``; ``client`` names them.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from email.message import Message
from typing import Callable, Mapping, Protocol
from urllib.parse import urlsplit

from exporter.deadline import WATCHDOG

# Answers are read in pieces of at most this many bytes.
READ_CHUNK_BYTES = 16 * 1024
# An error answer's body up to this size, arriving within this time, is read away to
# keep the connection; otherwise the connection is dropped.
DRAIN_BYTES = 64 * 1024
DRAIN_SECONDS = 1.0


class Interrupted(ConnectionError):
    """The session was closed while a request waited for its turn or was in flight."""


class AnswerTooLarge(ValueError):
    """The answer's body (after decompression) is over the session's size cap."""


class BadEncoding(ValueError):
    """The answer's body does not decompress, or uses an encoding nobody asked for."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer: status, headers and (decompressed) body."""

    status: int
    headers: Message
    body: bytearray


class Pacing(Protocol):
    """Holds requests back (ratelimit.Pacer): ``paced`` waits for the turn of the API
    path's endpoint, runs ``send`` and hears its status; ``close`` ends a wait at once."""

    def paced(self, path: str, send: Callable[[], Reply]) -> Reply: ...

    def close(self) -> None: ...


# A kept-alive connection that the server had already closed fails like this on its
# next request, before any answer: sending again on a new connection is safe (every
# call of this API only reads).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _left(deadline: float) -> float:
    """What is left of ``deadline``, as a socket timeout; TimeoutError when nothing is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's timeout has passed")
    return left


class ApiSession:
    """Requests to one base URL over one kept-alive connection: one caller at a time
    (the cluster's poller); ``close()`` from any thread. Header values are written as
    they are: config holds them to printable ASCII."""

    def __init__(self, base_url: str, headers: Mapping[str, str], *, ca_file: str = "",
                 verify: bool = True, max_body_bytes: int = 64 * 1024 * 1024) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = (parts.hostname or "").encode("idna").decode("ascii")   # config checked
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.prefix = parts.path.rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.pacer: Pacing | None = None
        shown = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port and parts.port != _DEFAULT_PORTS[parts.scheme]:
            shown += f":{parts.port}"
        fields = {"Host": shown, **headers, "Accept-Encoding": "gzip"}
        self._head = "".join(f"{name}: {value}\r\n"
                             for name, value in fields.items()).encode("ascii")
        self._ca_file, self._verify = ca_file, verify
        self._context: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()       # _sock, _busy and _closed, against close()
        self._busy = False
        self._closed = False

    def exchange(self, method: str, path: str, *, query: str = "", body: bytes | None = None,
                 timeout: float, heard: Callable[[int], None] | None = None) -> Reply:
        """Send ``method`` to ``prefix + path`` (after the pacer's wait, which is no
        part of ``timeout``) and read the whole answer within ``timeout``.

        ``heard`` gets the status as soon as the headers are in, so a failure while
        reading the body is still counted under the status that came back.
        """
        target = self.prefix + path + ("?" + query if query else "")
        request = b"%s %s HTTP/1.1\r\n%s" % (method.encode("ascii"),
                                              target.encode("ascii"), self._head)
        if body is None:
            request += b"\r\n"
        else:
            request += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" \
                % (len(body), body)

        def send() -> Reply:
            return self._send(method, request, timeout, heard)
        if self.pacer is None:
            return send()
        return self.pacer.paced(path, send)

    def _send(self, method: str, request: bytes, timeout: float,
              heard: Callable[[int], None] | None) -> Reply:
        deadline = time.monotonic() + timeout     # connecting and TLS count too
        for attempt in (1, 2):
            sock: socket.socket | None = None
            response: http.client.HTTPResponse | None = None
            watch = None
            reused = answered = False
            try:
                sock, reused = self._take(deadline)
                sock.settimeout(_left(deadline))
                # Socket timeouts bound each read; a server that trickles its headers,
                # a chunk-size line or trailers a byte at a time would never trip one.
                # The watchdog shuts the socket down at the deadline, whatever is read.
                watch = WATCHDOG.arm(deadline, sock)
                sock.sendall(request)
                response = http.client.HTTPResponse(sock, method=method)
                response.begin()
                answered = True
                if heard is not None:
                    heard(response.status)
                if 200 <= response.status < 300:
                    reply = Reply(response.status, response.msg,
                                  self._body(sock, response, deadline))
                    keep = not response.will_close
                else:       # nobody reads an error's body: only its status and headers
                    reply = Reply(response.status, response.msg, bytearray())
                    keep = self._drain(sock, response, deadline)
                WATCHDOG.disarm(watch)
                if not keep or watch.fired:   # fired as the answer ended: shut down
                    response.close()
                    self._drop(sock)
                return reply
            except Exception as exc:
                if watch is not None:
                    WATCHDOG.disarm(watch)
                if response is not None:
                    response.close()         # it holds the socket open otherwise
                if sock is not None:
                    self._drop(sock)         # left mid-answer: it cannot carry another
                if self._closed:
                    raise Interrupted("the session was closed") from None
                if watch is not None and watch.fired:
                    raise TimeoutError("no complete answer within the timeout") from None
                # Only a kept-alive connection that failed before any answer came is
                # sent again, once, within what is left of the same deadline.
                if answered or not reused or attempt == 2 or not isinstance(exc, _STALE):
                    raise
            finally:
                self._give_back()
        raise AssertionError("unreachable")   # pragma: no cover

    def _body(self, sock: socket.socket, response: http.client.HTTPResponse,
              deadline: float) -> bytearray:
        """The whole body, decompressed, or AnswerTooLarge past ``max_body_bytes`` and
        TimeoutError past ``deadline``: each read waits at most for what is left."""
        limit = self.max_body_bytes
        if response.length is not None and response.length > limit:
            raise AnswerTooLarge(f"{response.length} bytes declared")
        encoding = (response.msg.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise BadEncoding(f"unrequested Content-Encoding {encoding[:20]!r}")
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        body = bytearray()
        while True:
            sock.settimeout(_left(deadline))
            # read1: what has arrived, so the deadline is checked between arrivals
            chunk = response.read1(READ_CHUNK_BYTES)
            if not chunk:
                break
            if inflate is not None:     # at most one byte past the cap: enough to know
                try:
                    chunk = inflate.decompress(chunk, limit + 1 - len(body))
                except zlib.error:
                    raise BadEncoding("the body does not decompress") from None
            body += chunk
            if len(body) > limit:
                raise AnswerTooLarge("more than the cap")
        if response.length:          # read1 ends quietly when the server hangs up early
            raise http.client.IncompleteRead(b"", response.length)
        if inflate is not None and not inflate.eof:
            raise BadEncoding("the compressed body is cut short")
        response.close()                     # its reader, not the connection
        return body                          # not copied: json reads a bytearray as is

    @staticmethod
    def _drain(sock: socket.socket, response: http.client.HTTPResponse,
               deadline: float) -> bool:
        """Read a small error body away so the connection carries on; False when it is
        large, unframed or slow to come: dropping the connection is cheaper."""
        if response.will_close or response.length is None or response.length > DRAIN_BYTES:
            return False
        deadline = min(deadline, time.monotonic() + DRAIN_SECONDS)
        try:
            while response.length:
                sock.settimeout(_left(deadline))
                if not response.read1(response.length):
                    return False
        except (OSError, http.client.HTTPException):
            return False
        response.close()
        return True

    def _take(self, deadline: float) -> tuple[socket.socket, bool]:
        """The kept-alive connection (True) or a new one (False). A new one is in
        ``_sock`` before its TLS handshake, so close() can cut that short too."""
        with self._lock:
            if self._closed:
                raise Interrupted("the session was closed")
            self._busy = True
            if self._sock is not None:
                return self._sock, True
        sock = socket.create_connection((self.host, self.port), _left(deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.https:
            try:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.host,
                                                       do_handshake_on_connect=False)
            except BaseException:
                sock.close()
                raise
        with self._lock:
            closed = self._closed
            if not closed:
                self._sock = sock
        if closed:
            sock.close()
            raise Interrupted("the session was closed")
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(_left(deadline))
                sock.do_handshake()
            except BaseException:
                self._drop(sock)
                raise
        return sock, False

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
        sock.close()

    def _give_back(self) -> None:
        with self._lock:
            self._busy = False
            sock = self._sock if self._closed else None
            if self._closed:
                self._sock = None
        if sock is not None:
            sock.close()

    def _tls_context(self) -> ssl.SSLContext:
        """Made once per session: loading a trust store costs milliseconds."""
        if self._context is None:
            context = ssl.create_default_context(cafile=self._ca_file or None)
            if not self._verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    def close(self) -> None:
        """End a wait for the rate limiter and a request in flight; refuse any more."""
        with self._lock:
            self._closed = True
            sock = self._sock
            if self._busy:
                sock = None
                if self._sock is not None:   # its thread closes it when the read fails
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            else:
                self._sock = None
        if sock is not None:
            sock.close()
        if self.pacer is not None:
            self.pacer.close()

"""The API client's HTTP (requests, with deadline.DeadlineAdapter mounted) against a
loopback server whose every byte on the wire is scripted: keep-alive, the one retry of a
connection the server had closed, framing and encodings, one deadline for the whole
request, and close() from another thread."""

from __future__ import annotations

import dataclasses
import gzip
import socket
import struct
import threading
import time
from typing import Callable, Iterator, Union

import pytest

import requests

from exporter.client import DRAIN_BYTES, _request, make_session
from exporter.errors import ConnectionFailure, DecodeFailure, HttpFailure, TimeoutFailure
from exporter.config import ClusterConfig, PollSettings

# What the server does for one request: answer these bytes, then keep the connection,
# or "close" right after answering (no header says so), or "reset" it, or "trickle"
# them a byte at a time ("trickle-body": the headers at once), or "drop" without
# answering, or "hang" until the client goes.
Step = Union[bytes, str, tuple[bytes, str]]


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class ScriptedServer:
    """Serves ``steps`` in order, one per request, across however many connections."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = list(steps)
        self.connections = 0
        self.hangups = 0                     # connections the client closed
        self.requests: list[bytes] = []
        self.seen = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while not self._stop.is_set():
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    try:
                        line = reader.readline()
                    except OSError:             # reset by the client: a hang-up too
                        line = b""
                    if not line:
                        self.hangups += 1
                        return
                    head += line
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + reader.read(length))
                self.seen.set()
                step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
                data, then = step if isinstance(step, tuple) else (
                    (step, "keep") if isinstance(step, bytes) else (b"", step))
                if then == "hang":
                    while not self._stop.is_set() and conn.recv(1):
                        pass
                    return
                if then.startswith("trickle"):   # a byte every 50 ms while it is read
                    if then == "trickle-body":    # the headers at once
                        at_once, data = data.split(b"\r\n\r\n", 1)
                        conn.sendall(at_once + b"\r\n\r\n")
                    for byte in data:
                        if self._stop.wait(0.05):
                            return
                        try:
                            conn.sendall(bytes([byte]))
                        except OSError:
                            return
                    return
                conn.sendall(data)
                if then == "reset":         # RST, not FIN: the client's read fails
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                if then in ("close", "drop", "reset"):
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(2)


@pytest.fixture
def scripted() -> Iterator[Callable[[list[Step]], ScriptedServer]]:
    """Starts scripted servers; closes them after the test."""
    servers: list[ScriptedServer] = []

    def start(steps: list[Step]) -> ScriptedServer:
        servers.append(ScriptedServer(steps))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def wait(check: Callable[[], bool], seconds: float = 5) -> bool:
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


@dataclasses.dataclass
class Api:
    """A cluster's session and config, as the poller holds them."""

    session: requests.Session
    cluster: ClusterConfig

    def call(self, path: str = "/list", *, body: dict[str, str] | None = None,
             timeout: float = 5, heard: list[str] | None = None) -> bytes:
        def observe(endpoint: str, code: str) -> None:
            if heard is not None:
                heard.append(code)
        cluster = dataclasses.replace(self.cluster, settings=dataclasses.replace(
            self.cluster.settings, timeout=timeout))
        return bytes(_request(self.session, cluster, "list", path, observe,
                              params=None if body is not None else {"page": 1}, body=body))

    def close(self) -> None:
        self.session.close()


def api_at(url: str, *, verify: bool = True, **settings: int) -> Api:
    cluster = ClusterConfig(name="t", url=url, api="v2", api_key="k",
                            tls_insecure_skip_verify=not verify,
                            settings=PollSettings(**settings))  # type: ignore[arg-type]
    return Api(make_session(cluster), cluster)


def session(server: ScriptedServer, **settings: int) -> Api:
    return api_at(server.url + "/base", **settings)


def get(api: Api, path: str = "/list") -> bytes:
    return api.call(path)


def test_requests_share_one_kept_alive_connection_and_name_the_path(scripted) -> None:
    server = scripted([answer(b"one"), answer(b"two")])
    api = session(server)
    assert [get(api), get(api), get(api)] == [b"one", b"two", b"two"]
    assert server.connections == 1 and len(server.requests) == 3
    first = server.requests[0].decode()
    assert first.startswith("GET /base/list?page=1 HTTP/1.1\r\n")
    assert f"Host: {server.url.split('://')[1]}\r\n" in first
    assert "Authorization: Bearer k\r\n" in first and "Accept-Encoding: gzip\r\n" in first


def test_a_post_sends_its_json_body_with_its_length(scripted) -> None:
    server = scripted([answer(b"{}")])
    session(server).call("/describe", body={"jobId": "j"})
    request = server.requests[0]
    assert b"\r\nContent-Type: application/json\r\n" in request
    assert b"\r\nContent-Length: 14\r\n" in request
    assert request.endswith(b'\r\n\r\n{"jobId": "j"}')


def test_a_connection_the_server_closed_while_idle_is_reopened_once(scripted) -> None:
    server = scripted([(answer(b"one"), "close"), answer(b"two")])
    api = session(server)
    assert get(api) == b"one"
    assert get(api) == b"two"                   # the dead connection cost nothing visible
    assert server.connections == 2 and len(server.requests) == 2


def test_only_a_kept_alive_connection_is_retried_and_only_once(scripted) -> None:
    fresh = scripted(["drop"])
    with pytest.raises(ConnectionFailure):
        get(session(fresh))
    assert len(fresh.requests) == 1             # a new connection failing: no retry
    kept = scripted([answer(b"one"), "drop"])
    api = session(kept)
    get(api)
    with pytest.raises(ConnectionFailure):
        get(api)
    assert len(kept.requests) == 3 and kept.connections == 2


def test_connection_close_and_an_unframed_answer_end_the_connection(scripted) -> None:
    # The first answer says close but leaves the connection open: only a client that
    # heeds the header opens a new one.
    server = scripted([answer(b"one", "Connection: close"),
                       (b"HTTP/1.1 200 OK\r\n\r\nread to the end", "close"), answer(b"three")])
    api = session(server)
    assert [get(api), get(api), get(api)] == [b"one", b"read to the end", b"three"]
    assert server.connections == 3 and len(server.requests) == 3


def test_chunked_and_gzipped_answers_are_decoded(scripted) -> None:
    packed = gzip.compress(b'{"code": 0}')
    server = scripted([answer(chunked(b"ab", b"cd"), "Transfer-Encoding: chunked"),
                       answer(chunked(packed[:5], packed[5:]), "Transfer-Encoding: chunked",
                              "Content-Encoding: gzip")])
    api = session(server)
    assert [get(api), get(api)] == [b"abcd", b'{"code": 0}']
    assert server.connections == 1


@pytest.mark.parametrize("body,headers", [
    (b"x", ("Content-Encoding: br",)),
    (gzip.compress(b"x" * 100, mtime=0)[:-12], ("Content-Encoding: gzip",)),
    (b"not gzip at all", ("Content-Encoding: gzip",)),
], ids=["unrequested", "cut-short", "not-gzip"])
def test_an_encoding_nobody_asked_for_or_a_broken_one_is_refused(scripted, body,
                                                                 headers) -> None:
    server = scripted([answer(body, *headers), answer(b"next")])
    api = session(server)
    with pytest.raises(DecodeFailure):
        get(api)
    assert get(api) == b"next"                   # on a new connection
    assert server.connections == 2


def test_the_status_is_heard_before_a_body_over_the_cap(scripted) -> None:
    server = scripted([answer(b"x" * 1025)])
    heard: list[str] = []
    with pytest.raises(DecodeFailure) as failure:
        session(server, max_response_bytes=1024).call(heard=heard)
    assert heard == ["200"]
    # the connection is closed at once, not when the failure is garbage (it is alive)
    assert failure.value is not None and wait(lambda: server.hangups == 1)


def test_an_error_answer_is_its_status_and_headers_whatever_its_body(scripted) -> None:
    """A 503 saying when to come back is that, even with a body that is no gzip. A small
    body is read away and the connection carries on; a large one is not worth it."""
    server = scripted([answer(b"busy", "Retry-After: 7", "Content-Encoding: gzip",
                              status="503 Service Unavailable"), answer(b"next"),
                       answer(b"x" * (DRAIN_BYTES + 1), status="502 Bad Gateway"),
                       answer(b"last")])
    api = session(server)
    with pytest.raises(HttpFailure) as busy:
        get(api)
    assert (busy.value.status, busy.value.retry_after, busy.value.retryable) == (503, 7, True)
    assert get(api) == b"next" and server.connections == 1    # read away: kept
    with pytest.raises(HttpFailure) as bad:
        get(api)
    assert bad.value.status == 502
    assert get(api) == b"last" and server.connections == 2    # dropped


def test_a_body_cut_short_is_a_broken_answer_not_a_short_one(scripted) -> None:
    server = scripted([(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd", "close")])
    with pytest.raises(ConnectionFailure, match="broke off its answer"):
        get(session(server))


@pytest.mark.parametrize("then", ["close", "reset"])
def test_a_connection_lost_mid_answer_is_not_sent_again(scripted, then: str) -> None:
    server = scripted([answer(b"one"),
                       (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", then)])
    api = session(server)
    get(api)
    heard: list[str] = []
    with pytest.raises(ConnectionFailure):
        api.call(heard=heard)
    assert heard == ["200"] and len(server.requests) == 2


def closed_mid_request(api: Api, begun: Callable[[], bool],
                       settle: float = 0.0) -> BaseException:
    """Close ``api`` from here once its request in flight has ``begun`` (and ``settle``
    seconds more); what that request raised, within a few seconds."""
    outcome: list[BaseException] = []

    def request() -> None:
        try:
            api.call(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)
    thread = threading.Thread(target=request)
    thread.start()
    assert wait(begun)
    time.sleep(settle)
    started = time.monotonic()
    api.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 1
    return outcome[0]


def interrupted(failure: BaseException) -> bool:
    return isinstance(failure, ConnectionFailure) and "session was closed" in str(failure)


def test_close_from_another_thread_ends_a_request_in_flight(scripted) -> None:
    server = scripted(["hang"])
    assert interrupted(closed_mid_request(session(server), server.seen.is_set))


def test_a_stalled_tls_handshake_ends_by_the_timeout_or_by_close(scripted) -> None:
    """The server takes the connection and never answers the ClientHello: connecting
    counts against the request's timeout, and close() cuts the handshake short."""
    server = scripted(["hang"])
    tls_url = server.url.replace("http://", "https://")
    started = time.monotonic()
    with pytest.raises(TimeoutFailure):
        api_at(tls_url).call(timeout=0.3)
    assert time.monotonic() - started < 3
    failure = closed_mid_request(api_at(tls_url), lambda: server.connections == 2,
                                 settle=0.05)       # into the handshake
    assert interrupted(failure)


def test_an_answer_trickling_in_ends_at_the_timeout_whatever_part_it_is_in(
        scripted) -> None:
    """Each read gets its own socket timeout, but headers, a chunk-size line and
    trailers are read with many: only the deadline bounds an answer dripping in a byte
    at a time."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for step in ((head, "trickle"), (head + b"1" * 400, "trickle-body"),     # a size line
                 (head + b"2\r\n{}\r\n0\r\n" + b"X-T: 1\r\n" * 40, "trickle-body")):
        server = scripted([step])
        started = time.monotonic()
        with pytest.raises(TimeoutFailure):
            session(server).call(timeout=0.5)
        assert time.monotonic() - started < 0.5 + 1        # 20 s and more without it


# verify=False here is the test's own choice (tls_insecure_skip_verify), as in the CLI
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_connecting_and_tls_count_against_the_timeout(pki) -> None:
    """A handshake that takes 0.2 s and an answer 0.2 s after the request: 0.4 s in all,
    past a 0.3 s timeout, though neither part alone is."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        time.sleep(0.2)
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            time.sleep(0.2)
            tls.sendall(answer(b"late"))
    threading.Thread(target=serve, daemon=True).start()
    api = api_at(f"https://127.0.0.1:{listener.getsockname()[1]}", verify=False)
    try:
        with pytest.raises(TimeoutFailure):
            api.call(timeout=0.3)
    finally:
        listener.close()


def test_a_closed_session_sends_nothing(scripted) -> None:
    server = scripted([answer(b"one")])
    api = session(server)
    get(api)
    api.close()
    with pytest.raises(ConnectionFailure, match="session was closed"):
        get(api)
    assert len(server.requests) == 1


def guard_counting(api: Api) -> list[str]:
    """Install a guard on ``api``'s adapter that records each pass and release."""
    passes: list[str] = []

    def guard() -> Callable[[], None]:
        passes.append("pass")
        return lambda: passes.append("release")
    api.session.get_adapter("https://").guard = guard   # type: ignore[attr-defined]
    return passes


def test_the_guard_is_passed_by_every_attempt_and_never_during_a_connect(scripted) -> None:
    """A retried request is written again: it passes the guard again. A handshake that
    never ends holds no guard (the describe lane must not hold the listings back)."""
    kept = scripted([answer(b"one"), "drop", answer(b"two")])
    api = session(kept)
    passes = guard_counting(api)
    get(api)
    assert get(api) == b"two"          # the kept connection dropped: sent again
    assert passes == ["pass", "release"] * 3
    stalled = scripted(["hang"])
    tls = api_at(stalled.url.replace("http://", "https://"))
    passes = guard_counting(tls)
    with pytest.raises(TimeoutFailure):
        tls.call(timeout=0.3)
    assert passes == []

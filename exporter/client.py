"""One API call, for both flavours: a page of the "list import jobs" listing, or the
details of one job ("describe"); and, for discovery, a page of the clusters a key can
see on Zilliz Cloud's control plane ("list clusters").

Errors form a small tree whose ``reason`` is the contract's poll-error reason:

    PollFailure                           every way a poll can fail
    ├── ApiFailure        reason "api"    the body said no (non-success code)
    ├── AuthFailure       reason "auth"   HTTP 401/403 or a bad-key body code
    ├── TimeoutFailure    reason "timeout"
    ├── ConnectionFailure reason "connection"
    ├── HttpFailure       reason "http"   any other non-200 status
    ├── DecodeFailure     reason "decode" not JSON, or not the documented shape
    └── PaginationFailure reason "pagination" (raised by the poller)

``retryable`` tells the poller whether another attempt may help (timeouts,
connection errors, 429 and 5xx), and ``retry_after`` carries a server's hint.
No message ever holds the API key or a proxy's password: they are built here, never
copied from requests' exceptions, and scrubbed of the key once more before they leave.

HTTP is ``requests``: one ``requests.Session`` per cluster (kept alive, pooled), with
``deadline.DeadlineAdapter`` mounted for what requests cannot do alone (one deadline for
the whole request, pacing, close() from another thread). Answers are streamed, so
``max_response_bytes`` is enforced as they arrive, after gunzip.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import math
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import requests
from requests.utils import get_environ_proxies
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from exporter import __version__
from exporter.config import REDACTED, ClusterConfig, DiscoveryConfig
from exporter.deadline import DeadlineAdapter, Interrupted, finish
from exporter.jobs import JobRecord, normalise_state
from exporter.logs import bind

log = logging.getLogger("exporter.client")

# Body codes that mean the credentials are refused (API-NOTES): v1 80001 "The token is
# illegal" and 80002 "The token is invalid"; v2 21119 "The apikey is illegal." and
# 96014-96017 "no permission for the cluster" (like HTTP 403); Milvus 1800 (with HTTP 401).
AUTH_BODY_CODES = frozenset({80001, 80002, 21119, 96014, 96015, 96016, 96017, 1800})
V1_SUCCESS_CODES = frozenset({200})
# Milvus 2.4.0 to about 2.4.4 answered 200 in v2 bodies; later servers answer 0.
V2_SUCCESS_CODES = frozenset({0, 200})
# A failure text becomes a label value: one line, bounded.
MAX_REASON_CHARS = 200

# Answers are read in pieces of at most this many bytes.
READ_CHUNK_BYTES = 16 * 1024
# An error answer's body up to this size is read away to keep the connection; a larger
# one is not worth it: the connection is dropped.
DRAIN_BYTES = 64 * 1024
# requests reads only the first of these (REQUESTS_CA_BUNDLE); the exporter honours both.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class PollFailure(Exception):
    """Every way a poll can fail; each subclass names its contract reason."""

    reason: str
    retryable = False

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApiFailure(PollFailure):
    reason = "api"


class AuthFailure(PollFailure):
    reason = "auth"


class TimeoutFailure(PollFailure):
    reason = "timeout"
    retryable = True


class ConnectionFailure(PollFailure):
    reason = "connection"
    retryable = True


class HttpFailure(PollFailure):
    reason = "http"

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.status = status
        self.retryable = status == 429 or status >= 500


class DecodeFailure(PollFailure):
    reason = "decode"


class PaginationFailure(PollFailure):
    reason = "pagination"


def label_text(text: str) -> str:
    """Server text made safe for a label value: valid UTF-8 (lone surrogates, which
    JSON allows and UTF-8 cannot encode, become U+FFFD), control characters removed.

    Without this, one such name in one listing would make every scrape fail.
    """
    if text.isascii() and text.isprintable():
        return text
    return _CONTROL.sub("", _SURROGATE.sub("\ufffd", text))


@dataclass(frozen=True)
class ListingPage:
    """One page as the server sent it; ``count`` is the body's count, if any.

    ``reasons`` holds the failure text of the records that carry one (Milvus lists
    them), by job id: few jobs have one, so records stay four small fields.
    """

    records: tuple[JobRecord, ...]
    count: int | None
    reasons: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobDetails:
    """What "describe one job" says; -1 where the flavour or server gives nothing.

    ``progress`` is a percentage (v1 ``readyPercentage``, v2 ``progress``); ``state``
    is normalised, or "" for v1, which reports none; ``reason`` is a sanitised
    failure text (see ``failure_text``), "" when the job has not failed. The times
    are Unix times, None when the answer gives none with a zone (see ``timestamp``):
    ``complete_time`` once the job is done, ``create_time`` on the newest Milvus only.
    """

    job_id: str
    progress: int = -1
    imported_rows: int = -1
    total_rows: int = -1
    state: str = ""
    reason: str = ""
    create_time: float | None = None
    complete_time: float | None = None


def make_session(cluster: ClusterConfig) -> requests.Session:
    """A keep-alive session carrying the cluster's credentials, trust and proxy (a
    discovery source's: ``DiscoveryConfig.control_plane``).

    ``trust_env`` is off: the environment's proxies and CA bundle are read here, by the
    contract's rules (a setting in the config file wins), and never a .netrc, whose
    password would replace the API key.
    """
    session = requests.Session()
    session.trust_env = False
    session.headers.update({"User-Agent": f"zilliz-import-exporter/{__version__}",
                            "Accept": "application/json", "Accept-Encoding": "gzip"})
    if cluster.api_key:
        session.headers["Authorization"] = f"Bearer {cluster.api_key}"
    if cluster.api == "v2" and cluster.db_name:
        session.headers["DB-Name"] = cluster.db_name
    session.verify = trust(cluster)
    session.proxies = proxies(cluster)
    adapter = DeadlineAdapter()
    for prefix in ("https://", "http://"):
        session.mount(prefix, adapter)
    return session


def trust(cluster: ClusterConfig) -> bool | str:
    """What the cluster's certificates are checked against: ``tls_ca_file``, else the
    environment's CA bundle, else certifi (requests' own default); False to skip."""
    if cluster.tls_insecure_skip_verify:
        return False
    if cluster.tls_ca_file:
        return cluster.tls_ca_file
    return next((os.environ[name] for name in CA_BUNDLE_VARIABLES if os.environ.get(name)),
                True)


def proxies(cluster: ClusterConfig) -> dict[str, str]:
    """The proxy for the cluster's URL: ``proxy_url``, else the environment's
    HTTPS_PROXY / HTTP_PROXY unless NO_PROXY names the host (either case), else none."""
    settings = cluster.settings
    if settings.proxy_url:
        return {"http": settings.proxy_url, "https": settings.proxy_url}
    if not settings.proxy_from_environment:
        return {}
    found: dict[str, str] = get_environ_proxies(cluster.url)
    scheme = urlsplit(cluster.url).scheme
    return {scheme: found[scheme]} if scheme in found else {}


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After in seconds or as an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


def _scrub(text: str, secret: str) -> str:
    if secret:
        text = text.replace(secret, REDACTED)
        if ":" in secret:  # user:password: never show the password alone either
            text = text.replace(secret.split(":", 1)[1], REDACTED)
    return text


def failure_text(raw: Any, secret: str) -> str:
    """A server's failure text as a label value: one line of at most 200 characters,
    whitespace collapsed, the API key scrubbed should a server ever echo it."""
    if raw is None:
        return ""
    text = label_text(" ".join(_scrub(str(raw), secret).split()))
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


# Observers hear (endpoint, code) for every HTTP request: endpoint "list", "describe"
# or "clusters", code the HTTP status or "error".
Observer = Callable[[str, str], None]


def _ignore(endpoint: str, code: str) -> None:
    pass


def _scrubbed(call: Callable[[], Any], cluster: ClusterConfig) -> Any:
    """Run one API call; no failure leaves it carrying the API key. (A proxy's password
    cannot be in one: no message copies the text of requests' exceptions.)"""
    try:
        return call()
    except PollFailure as failure:
        scrubbed = _scrub(str(failure), cluster.api_key)
        if scrubbed != str(failure):
            failure.args = (scrubbed,)
        raise


def list_import_jobs(session: requests.Session, cluster: ClusterConfig, current_page: int,
                     observe: Observer = _ignore) -> ListingPage:
    """Fetch one page of the listing."""
    def call() -> ListingPage:
        settings = cluster.settings
        if cluster.api == "v1":
            params: dict[str, str | int] = {
                "clusterId": cluster.cluster_id, "pageSize": settings.page_size,
                "currentPage": current_page}
            answer = _request(session, cluster, "list", "/v1/vector/collections/import/list",
                              observe, params=params, page=current_page)
        else:
            body = {"clusterId": cluster.cluster_id, "pageSize": settings.page_size,
                    "currentPage": current_page, "dbName": cluster.db_name,
                    "projectId": cluster.project_id, "regionId": cluster.region_id}
            answer = _request(session, cluster, "list", "/v2/vectordb/jobs/import/list",
                              observe, body=body, page=current_page)
        return parse_list_answer(answer, cluster)
    result: ListingPage = _scrubbed(call, cluster)
    return result


DESCRIBE_PATH = "/v2/vectordb/jobs/import/describe"
# Milvus 2.4.0 to 2.4.12 serve only this one (same body, same answer).
GET_PROGRESS_PATH = "/v2/vectordb/jobs/import/get_progress"


def describe_import_job(session: requests.Session, cluster: ClusterConfig, job_id: str, *,
                        get_progress: bool = False, observe: Observer = _ignore) -> JobDetails:
    """The details of one job; ``get_progress`` selects the old Milvus path.

    Raises the same PollFailure tree as the list call; an HTTP 404 on ``describe``
    (an HttpFailure with status 404) means the server predates it.
    """
    def call() -> JobDetails:
        if cluster.api == "v1":
            params: dict[str, str | int] = {"jobId": job_id, "clusterId": cluster.cluster_id}
            answer = _request(session, cluster, "describe",
                              "/v1/vector/collections/import/get", observe, params=params)
        else:
            body = {"jobId": job_id, "clusterId": cluster.cluster_id,
                    "projectId": cluster.project_id, "regionId": cluster.region_id}
            path = GET_PROGRESS_PATH if get_progress else DESCRIBE_PATH
            answer = _request(session, cluster, "describe", path, observe, body=body)
        return parse_describe_answer(answer, cluster, job_id)
    result: JobDetails = _scrubbed(call, cluster)
    return result


def _request(session: requests.Session, cluster: ClusterConfig, endpoint: str, path: str,
             observe: Observer, *, params: dict[str, str | int] | None = None,
             body: dict[str, Any] | None = None, page: int = 0) -> bytearray:
    """Send one request (GET with ``params`` or POST with ``body``); the answer's body.

    ``timeout`` bounds the whole request, connecting and the body included (the
    adapter's deadline): a server that never stops sending fails with reason timeout,
    and one that sends more than ``max_response_bytes`` with reason decode.
    """
    host, timeout = cluster.host, cluster.settings.timeout
    started = time.monotonic()
    try:
        response = session.request("GET" if body is None else "POST", cluster.url + path,
                                   params=params, json=body, timeout=timeout, stream=True,
                                   allow_redirects=False)
    except requests.RequestException as exc:
        observe(endpoint, "error")
        raise _failure(exc, host, timeout, answered=False) from None
    status = response.status_code
    observe(endpoint, str(status))
    if log.isEnabledFor(logging.DEBUG):
        fields: dict[str, Any] = {"path": path, "status": status,
                                  "duration_seconds": round(time.monotonic() - started, 3)}
        if page:
            fields["page"] = page
        bind(log, cluster_name=cluster.name).debug("api request", extra={"fields": fields})
    if status == 200:
        return _answer(response, cluster)
    _drain(response)
    finish(response)
    if status in (401, 403):
        raise AuthFailure(f"HTTP {status} from {host}: credentials refused")
    if 300 <= status < 400 and response.headers.get("Location"):
        # not followed: a redirected POST is not the same call; the operator fixes url
        target = label_text(" ".join(str(response.headers["Location"]).split()))[:200]
        raise HttpFailure(f"HTTP {status} from {host}: redirects to {target}; set url "
                          "to it", status)
    raise HttpFailure(f"HTTP {status} from {host}", status,
                      parse_retry_after(response.headers.get("Retry-After")))


def _answer(response: requests.Response, cluster: ClusterConfig) -> bytearray:
    """The body of a 200 answer, or the PollFailure that reading it came to. An answer
    that ends as the deadline passes was cut short by the adapter (a trickled header
    or chunk line ends as if the server had finished): a timeout, whatever was read."""
    host, timeout = cluster.host, cluster.settings.timeout
    connection = response.raw.connection    # urllib3 pools it again once it is read
    try:
        answer = _read_body(response, cluster)
        if finish(response):
            raise TimeoutFailure(f"no complete answer from {host} within {timeout:g}s")
    except (Urllib3Error, OSError) as exc:
        _discard(response, connection)
        raise _failure(exc, host, timeout, answered=True, fired=finish(response)) from None
    except PollFailure:
        _discard(response, connection)
        raise
    response.raw.release_conn()          # read to its end: the connection carries on
    return answer


def _discard(response: requests.Response, connection: Any) -> None:
    """Close a connection whose answer went wrong, even one already pooled again: what
    it carries next cannot be trusted."""
    response.close()
    if connection is not None:
        connection.close()
    finish(response)


def _failure(exc: Exception, host: str, timeout: float, *, answered: bool,
             fired: bool = False) -> PollFailure:
    """The PollFailure for what requests or urllib3 raised while sending or reading."""
    if isinstance(exc, Interrupted):
        return ConnectionFailure(f"the request to {host} was stopped: the session was closed")
    if fired or isinstance(exc, (requests.Timeout, Urllib3Timeout, TimeoutError)):
        return TimeoutFailure(f"no complete answer from {host} within {timeout:g}s")
    if isinstance(exc, requests.exceptions.SSLError):
        return ConnectionFailure(f"TLS with {host} failed: {_ssl_reason(exc)}")
    if isinstance(exc, requests.exceptions.ProxyError):
        return ConnectionFailure(f"cannot reach {host} through the proxy: "
                                 f"{_connection_reason(exc)}")
    if answered:
        return ConnectionFailure(f"{host} broke off its answer: {_connection_reason(exc)}")
    return ConnectionFailure(f"cannot reach {host}: {_connection_reason(exc)}")


def _read_body(response: requests.Response, cluster: ClusterConfig) -> bytearray:
    """The whole body, gunzipped here, so ``max_response_bytes`` caps what it becomes
    (a small bomb is no way around it); DecodeFailure past it or for a body that does
    not decompress. Read in pieces; the adapter's deadline bounds them all."""
    host, limit = cluster.host, cluster.settings.max_response_bytes
    too_large = f"{host} answered more than max_response_bytes={limit} bytes"
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise DecodeFailure(too_large)
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise DecodeFailure(f"{host} answered an unrequested Content-Encoding "
                            f"{label_text(encoding)[:20]!r}")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    body = bytearray()
    while chunk := response.raw.read(READ_CHUNK_BYTES, decode_content=False):
        if inflate is not None:     # at most one byte past the cap: enough to know
            try:
                chunk = inflate.decompress(chunk, limit + 1 - len(body))
            except zlib.error:
                raise DecodeFailure(f"{host} answered a body that does not decompress") \
                    from None
        body += chunk
        if len(body) > limit:
            raise DecodeFailure(too_large)
    if inflate is not None and not inflate.eof:
        raise DecodeFailure(f"{host} answered a compressed body that is cut short")
    return body                          # not copied: json reads a bytearray as is


def _drain(response: requests.Response) -> None:
    """Nobody reads an error's body, only its status and headers: a small one is read
    away so the connection carries on; a large or unframed one closes it."""
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) <= DRAIN_BYTES:
        try:
            while response.raw.read(DRAIN_BYTES, decode_content=False):
                pass
        except (Urllib3Error, OSError):
            response.close()
            return
        response.raw.release_conn()
    else:
        response.close()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(answer: bytes | bytearray, host: str) -> Any:
    """JSON, strictly: NaN and Infinity are not JSON, and nesting too deep for the
    parser is as malformed as a syntax error."""
    try:
        return json.loads(answer, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise DecodeFailure(f"{host} answered with a body that is not JSON") from None


def _ssl_reason(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"\[SSL: ([A-Z_]+)\][^(')\]]*", text) or re.search(
        r"(certificate verify failed[^(')\]]*)", text)
    return match.group(0).strip() if match else "handshake failed"


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    for needle in ("Connection refused", "Name or service not known", "Connection reset",
                   "timed out", "Remote end closed connection", "No route to host",
                   "Temporary failure in name resolution", "Connection aborted"):
        if needle in text:
            return needle.lower()
    return type(exc).__name__


def _data(payload: Any, cluster: ClusterConfig) -> dict[str, Any]:
    """The ``data`` object of a successful answer; PollFailure for any other."""
    data = _any_data(payload, cluster)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DecodeFailure(f"{cluster.host} answered a 'data' that is not an object")
    return data


def _any_data(payload: Any, cluster: ClusterConfig) -> Any:
    """The ``data`` of a successful answer, whatever its type; PollFailure for an answer
    that is no success."""
    host = cluster.host
    if not isinstance(payload, dict) or "code" not in payload:
        raise DecodeFailure(f"{host} answered JSON without a 'code'")
    code = payload.get("code")
    success = V1_SUCCESS_CODES if cluster.api == "v1" else V2_SUCCESS_CODES
    if type(code) is not int or code not in success:   # a list or object is no code
        message = payload.get("message")
        # scrubbed before it is cut to length: a key straddling the cut would leave
        # its first characters behind for _scrubbed to miss
        message = failure_text(message, cluster.api_key) \
            if isinstance(message, str) and message else "no message"
        if type(code) is int and code in AUTH_BODY_CODES:
            raise AuthFailure(f"{host} refused the credentials: code {code}: {message}")
        shown = str(code) if type(code) is int else type(code).__name__
        raise ApiFailure(f"{host} answered code {shown[:40]}: {message}")
    return payload.get("data")


def parse_list_answer(answer: bytes | bytearray, cluster: ClusterConfig) -> ListingPage:
    """One page of the listing from an answer's body; raises only PollFailure.

    Every field is checked: a malformed one is reason decode, never an exception
    that would escape the poll.
    """
    host = cluster.host
    data = _data(_json(answer, host), cluster)
    items = data.get("tasks" if cluster.api == "v1" else "records")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DecodeFailure(f"{host} answered a job list that is not a list")
    records = []
    reasons: dict[str, str] = {}
    # A page repeats a few collection and state names over many jobs: each is
    # cleaned (and a state normalised) once per page.
    collections: dict[str, str] = {}
    states: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict) or "jobId" not in item or "state" not in item:
            raise DecodeFailure(f"{host} answered a job without jobId or state")
        job_id, state = item["jobId"], item["state"]
        collection = item.get("collectionName") or ""
        progress = _percent(item.get("progress"))
        reason = item.get("reason")
        if type(job_id) is not str:
            if type(job_id) is not int:
                raise DecodeFailure(f"{host} answered a job whose jobId is malformed")
            job_id = str(job_id)
        if type(state) is not str or type(collection) is not str or progress is None \
                or not (reason is None or type(reason) is str):
            raise DecodeFailure(f"{host} answered a job {label_text(job_id)[:80]!r} with a "
                                "malformed state, collectionName, progress or reason")
        job_id = label_text(job_id)
        clean_collection = collections.get(collection)
        if clean_collection is None:
            clean_collection = collections[collection] = label_text(collection)
        clean_state = states.get(state)
        if clean_state is None:
            clean_state = states[state] = normalise_state(label_text(state))
        records.append(JobRecord(job_id, clean_collection, clean_state, progress))
        if reason:
            reasons[job_id] = failure_text(reason, cluster.api_key)
    count = data.get("count")
    if type(count) is not int:
        count = None
    return ListingPage(records=tuple(records), count=count, reasons=reasons)


def parse_describe_answer(answer: bytes | bytearray, cluster: ClusterConfig,
                          job_id: str) -> JobDetails:
    """A job's details from an answer's body; raises only PollFailure."""
    data = _data(_json(answer, cluster.host), cluster)
    if cluster.api == "v1":
        return _parse_v1_details(data, job_id, cluster.api_key)
    return _parse_v2_details(data, job_id, cluster.api_key)


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (bools included)."""
    if type(value) is int:
        return float(min(value, 2 ** 62)) if value > -2 ** 62 else float(-2 ** 62)
    if type(value) is float and math.isfinite(value):
        return value
    return None


def _percent(value: Any) -> int | None:
    """A progress percentage clamped to 0-100, -1 when absent; None when it is not a
    number (a finite one: 1e400 parses as infinity)."""
    if type(value) is int and 0 <= value <= 100:      # what servers send: at once
        return value
    if value is None:
        return -1
    number = _finite(value)
    if number is None:
        return None
    return min(100, max(0, round(number)))


def _number(value: Any) -> int:
    """A whole non-negative number from a JSON field, -1 when absent or malformed."""
    number = _finite(value)
    if number is None or number < 0:
        return -1
    return int(number)


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?"
                      r"([Zz]|[+-]\d\d:\d\d)")


def timestamp(value: Any) -> float | None:
    """An RFC 3339 time with its zone (Zilliz's ``Z``, Milvus's local ``+08:00``) as
    Unix time; None for ``""``, null, anything else, and a time without a zone, which
    could be any of 25 hours."""
    if type(value) is not str:
        return None
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    date, clock, fraction, zone = match.groups()
    fraction = f".{fraction[:6].ljust(6, '0')}" if fraction else ""
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        seconds = datetime.datetime.fromisoformat(
            f"{date}T{clock}{fraction}{zone}").timestamp()
    except (ValueError, OverflowError):     # a 13th month; a year past 9999 in UTC
        return None
    return seconds if seconds > 0 else None     # Go's zero time means "unset"


def _parse_v1_details(data: dict[str, Any], job_id: str, secret: str) -> JobDetails:
    # readyPercentage is documented as a percentage; whether a server sends 0-1
    # instead is unconfirmed, so it is read as the contract says: 0-100.
    ready = _finite(data.get("readyPercentage"))
    progress = -1 if ready is None or ready < 0 else min(100, round(ready))
    error = data.get("errorMessage")
    return JobDetails(job_id=job_id, progress=progress,
                      reason=failure_text(error, secret) if error else "",
                      complete_time=timestamp(data.get("completeTime")))


def _parse_v2_details(data: dict[str, Any], job_id: str, secret: str) -> JobDetails:
    state = data.get("state")
    progress = _number(data.get("progress"))
    reason = data.get("reason")
    return JobDetails(job_id=job_id, progress=min(progress, 100),
                      imported_rows=_number(data.get("importedRows")),
                      total_rows=_number(data.get("totalRows")),
                      state=normalise_state(label_text(state))
                      if isinstance(state, str) and state else "",
                      reason=failure_text(reason, secret) if reason else "",
                      create_time=timestamp(data.get("createTime")),
                      complete_time=timestamp(data.get("completeTime")))


# ---- discovery: the clusters a key can see ----------------------------------------------

CLUSTERS_PATH = "/v2/clusters"
# The fields of a listed cluster the exporter keeps, besides clusterId: text or absent.
_CLUSTER_FIELDS = ("clusterName", "regionId", "projectId", "plan", "status")


@dataclass(frozen=True)
class CloudCluster:
    """One cluster as the control plane lists it: every text label-safe, "" when the
    answer left it out. ``status`` is opaque (RUNNING, STOPPED, CREATING, ...)."""

    cluster_id: str
    name: str = ""          # clusterName, as the console shows it
    region_id: str = ""
    project_id: str = ""
    plan: str = ""
    status: str = ""


@dataclass(frozen=True)
class ClustersPage:
    """One page of clusters as the server sent it; ``count`` is the body's, if any."""

    records: tuple[CloudCluster, ...]
    count: int | None


def list_clusters(session: requests.Session, source: DiscoveryConfig, current_page: int,
                  observe: Observer = _ignore) -> ClustersPage:
    """Fetch one page of the clusters the source's key can see (``page_size`` of its
    settings a page: 100 unless set)."""
    plane = source.control_plane

    def call() -> ClustersPage:
        params: dict[str, str | int] = {"pageSize": source.settings.page_size,
                                        "currentPage": current_page}
        answer = _request(session, plane, "clusters", CLUSTERS_PATH, observe,
                          params=params, page=current_page)
        return parse_clusters_answer(answer, plane)
    result: ClustersPage = _scrubbed(call, plane)
    return result


def parse_clusters_answer(answer: bytes | bytearray, plane: ClusterConfig) -> ClustersPage:
    """A page of clusters from an answer's body: ``data`` an object holding
    ``clusters`` (as every example shows) or a bare array (as the schema says); raises
    only PollFailure."""
    host = plane.host
    data = _any_data(_json(answer, host), plane)
    count = None
    if isinstance(data, dict):
        items = data.get("clusters")
        count = data.get("count") if type(data.get("count")) is int else None
    elif data is None or isinstance(data, list):
        items = data
    else:
        raise DecodeFailure(f"{host} answered a 'data' that is neither an object nor a list")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DecodeFailure(f"{host} answered a cluster list that is not a list")
    records = []
    for item in items:
        cluster_id = item.get("clusterId") if isinstance(item, dict) else None
        if type(cluster_id) is not str or not cluster_id:
            raise DecodeFailure(f"{host} answered a cluster without a clusterId")
        texts = [item.get(name) for name in _CLUSTER_FIELDS]
        if not all(text is None or type(text) is str for text in texts):
            raise DecodeFailure(f"{host} answered a cluster {label_text(cluster_id)[:80]!r} "
                                "with a malformed clusterName, regionId, projectId, plan "
                                "or status")
        records.append(CloudCluster(label_text(cluster_id),
                                    *(label_text(text or "") for text in texts)))
    return ClustersPage(records=tuple(records), count=count)

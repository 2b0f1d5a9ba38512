"""One API call, for both flavours: a page of the "list import jobs" listing, or the
details of one job ("describe").

Errors form a small tree whose ``reason`` is the contract's poll-error reason:

    ApiFailure            reason "api"    the body said no (non-success code)
    ├── AuthFailure       reason "auth"   HTTP 401/403 or a bad-key body code
    ├── TimeoutFailure    reason "timeout"
    ├── ConnectionFailure reason "connection"
    ├── HttpFailure       reason "http"   any other non-200 status
    ├── DecodeFailure     reason "decode" not JSON, or not the documented shape
    └── PaginationFailure reason "pagination" (raised by the poller)

``retryable`` tells the poller whether another attempt may help (timeouts,
connection errors, 429 and 5xx), and ``retry_after`` carries a server's hint.
No message ever holds the API key: they are built here, not copied from the
transport, and scrubbed once more before they leave.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

import requests

from exporter import __version__
from exporter.config import ClusterConfig

log = logging.getLogger("exporter.client")

CANONICAL_STATES = ("pending", "importing", "completed", "failed")
ACTIVE_STATES = frozenset({"pending", "importing"})
TERMINAL_STATES = frozenset({"completed", "failed"})

AUTH_BODY_CODES = frozenset({80001, 21119, 1800})
V1_SUCCESS_CODES = frozenset({200})
# Milvus 2.4.0 to about 2.4.4 answered 200 in v2 bodies; later servers answer 0.
V2_SUCCESS_CODES = frozenset({0, 200})
# A failure text becomes a label value: one line, bounded.
MAX_REASON_CHARS = 200

_STATE_ALIASES = {"running": "importing", "importing": "importing"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class ApiFailure(Exception):
    reason = "api"
    retryable = False

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthFailure(ApiFailure):
    reason = "auth"


class TimeoutFailure(ApiFailure):
    reason = "timeout"
    retryable = True


class ConnectionFailure(ApiFailure):
    reason = "connection"
    retryable = True


class HttpFailure(ApiFailure):
    reason = "http"

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.status = status
        self.retryable = status == 429 or status >= 500


class DecodeFailure(ApiFailure):
    reason = "decode"


class PaginationFailure(ApiFailure):
    reason = "pagination"


@functools.lru_cache(maxsize=256)
def normalise_state(raw: str) -> str:
    """``ImportCompleted``/``Completed`` -> ``completed``; unknown -> snake_case.

    Cached: a listing holds a handful of distinct states over thousands of jobs.
    """
    name = raw[6:] if raw.startswith("Import") and raw[6:7].isupper() else raw
    snake = _CAMEL.sub("_", name).lower().replace(" ", "_").replace("-", "_")
    return _STATE_ALIASES.get(snake, snake)


class JobRecord(NamedTuple):
    """One job as listed; a tuple because a large listing holds 100,000 of them."""

    job_id: str
    collection: str
    state: str          # normalised
    progress: int       # -1 when the API reports none (v1)


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
    failure text (see ``failure_text``), "" when the job has not failed.
    """

    job_id: str
    progress: int = -1
    imported_rows: int = -1
    total_rows: int = -1
    state: str = ""
    reason: str = ""


class NameIndex:
    """Small integers for the few names (collections, states) that thousands of jobs
    repeat, so per-job storage holds an index instead of another string.

    Hot loops try ``index.get(name)`` first and call the object only for a new name.
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names: list[str] = list(names)
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}

    def __call__(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found


def make_session(cluster: ClusterConfig) -> requests.Session:
    """A keep-alive session carrying the cluster's credentials and TLS settings."""
    session = requests.Session()
    session.headers["User-Agent"] = f"zilliz-import-exporter/{__version__}"
    if cluster.api_key:
        session.headers["Authorization"] = f"Bearer {cluster.api_key}"
    if cluster.api == "v2" and cluster.db_name:
        session.headers["DB-Name"] = cluster.db_name
    if cluster.tls_insecure_skip_verify:
        session.verify = False
    elif cluster.tls_ca_file:
        session.verify = cluster.tls_ca_file
    session.trust_env = False
    return session


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
        text = text.replace(secret, "<secret>")
        if ":" in secret:  # user:password: never show the password alone either
            text = text.replace(secret.split(":", 1)[1], "<secret>")
    return text


def failure_text(raw: Any, secret: str) -> str:
    """A server's failure text as a label value: one line of at most 200 characters,
    whitespace collapsed, the API key scrubbed should a server ever echo it."""
    if raw is None:
        return ""
    text = " ".join(_scrub(str(raw), secret).split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


# Observers hear (endpoint, code) for every HTTP request: endpoint "list" or
# "describe", code the HTTP status or "error".
Observer = Callable[[str, str], None]


def _ignore(endpoint: str, code: str) -> None:
    pass


def _scrubbed(call: Callable[[], Any], secret: str) -> Any:
    """Run one API call; no failure leaves it carrying the API key."""
    try:
        return call()
    except ApiFailure as failure:
        scrubbed = _scrub(str(failure), secret)
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
            payload = _request(session, cluster, "list", "/v1/vector/collections/import/list",
                               observe, params=params, page=current_page)
        else:
            body = {"clusterId": cluster.cluster_id, "pageSize": settings.page_size,
                    "currentPage": current_page, "dbName": cluster.db_name,
                    "projectId": cluster.project_id, "regionId": cluster.region_id}
            payload = _request(session, cluster, "list", "/v2/vectordb/jobs/import/list",
                               observe, body=body, page=current_page)
        return _parse(payload, cluster)
    result: ListingPage = _scrubbed(call, cluster.api_key)
    return result


DESCRIBE_PATH = "/v2/vectordb/jobs/import/describe"
# Milvus 2.4.0 to 2.4.12 serve only this one (same body, same answer).
GET_PROGRESS_PATH = "/v2/vectordb/jobs/import/get_progress"


def describe_import_job(session: requests.Session, cluster: ClusterConfig, job_id: str, *,
                        get_progress: bool = False, observe: Observer = _ignore) -> JobDetails:
    """The details of one job; ``get_progress`` selects the old Milvus path.

    Raises the same ApiFailure tree as the list call; an HTTP 404 on ``describe``
    (an HttpFailure with status 404) means the server predates it.
    """
    def call() -> JobDetails:
        if cluster.api == "v1":
            params: dict[str, str | int] = {"jobId": job_id, "clusterId": cluster.cluster_id}
            payload = _request(session, cluster, "describe",
                               "/v1/vector/collections/import/get", observe, params=params)
            return _parse_v1_details(_data(payload, cluster), job_id, cluster.api_key)
        body = {"jobId": job_id, "clusterId": cluster.cluster_id,
                "projectId": cluster.project_id, "regionId": cluster.region_id}
        path = GET_PROGRESS_PATH if get_progress else DESCRIBE_PATH
        payload = _request(session, cluster, "describe", path, observe, body=body)
        return _parse_v2_details(_data(payload, cluster), job_id, cluster.api_key)
    result: JobDetails = _scrubbed(call, cluster.api_key)
    return result


def _request(session: requests.Session, cluster: ClusterConfig, endpoint: str, path: str,
             observe: Observer, *, params: dict[str, str | int] | None = None,
             body: dict[str, Any] | None = None, page: int = 0) -> Any:
    """Send one request (GET with ``params`` or POST with ``body``); the decoded JSON."""
    timeout = cluster.settings.timeout
    try:
        if body is None:
            response = session.get(cluster.url + path, params=params, timeout=timeout)
        else:
            response = session.post(cluster.url + path, json=body, timeout=timeout)
    except requests.Timeout:
        observe(endpoint, "error")
        raise TimeoutFailure(f"no answer from {cluster.host} within {timeout:g}s") from None
    except requests.exceptions.SSLError as exc:
        observe(endpoint, "error")
        raise ConnectionFailure(f"TLS with {cluster.host} failed: {_ssl_reason(exc)}") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        observe(endpoint, "error")
        raise ConnectionFailure(f"cannot reach {cluster.host}: {_connection_reason(exc)}") \
            from None
    except requests.RequestException as exc:
        observe(endpoint, "error")
        raise ConnectionFailure(f"request to {cluster.host} failed: {type(exc).__name__}") \
            from None
    status = response.status_code
    observe(endpoint, str(status))
    if log.isEnabledFor(logging.DEBUG):
        fields: dict[str, Any] = {"cluster_name": cluster.name,
                                  "path": urlsplit(response.url).path, "status": status,
                                  "duration_seconds": round(response.elapsed.total_seconds(), 3)}
        if page:
            fields["page"] = page
        log.debug("api request", extra={"fields": fields})
    if status in (401, 403):
        raise AuthFailure(f"HTTP {status} from {cluster.host}: credentials refused")
    if status != 200:
        raise HttpFailure(f"HTTP {status} from {cluster.host}", status,
                          parse_retry_after(response.headers.get("Retry-After")))
    try:
        return response.json()
    except ValueError:
        raise DecodeFailure(f"{cluster.host} answered with a body that is not JSON") from None


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
    """The ``data`` object of a successful answer; ApiFailure for any other."""
    host = cluster.host
    if not isinstance(payload, dict) or "code" not in payload:
        raise DecodeFailure(f"{host} answered JSON without a 'code'")
    code = payload.get("code")
    success = V1_SUCCESS_CODES if cluster.api == "v1" else V2_SUCCESS_CODES
    if type(code) is not int or code not in success:   # a list or object is no code
        message = str(payload.get("message") or "no message")[:200]
        if type(code) is int and code in AUTH_BODY_CODES:
            raise AuthFailure(f"{host} refused the credentials: code {code}: {message}")
        raise ApiFailure(f"{host} answered code {str(code)[:40]}: {message}")
    data = payload.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DecodeFailure(f"{host} answered a 'data' that is not an object")
    return data


def _parse(payload: Any, cluster: ClusterConfig) -> ListingPage:
    host = cluster.host
    data = _data(payload, cluster)
    items = data.get("tasks" if cluster.api == "v1" else "records")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DecodeFailure(f"{host} answered a job list that is not a list")
    records = []
    reasons: dict[str, str] = {}
    for item in items:
        try:
            job_id = item["jobId"]
            state = item["state"]
            collection = item.get("collectionName") or ""
            progress = item.get("progress")
            reason = item.get("reason")
        except (TypeError, KeyError, AttributeError):
            raise DecodeFailure(f"{host} answered a job without jobId or state") from None
        if type(job_id) is not str:
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                raise DecodeFailure(f"{host} answered a job whose jobId is malformed")
            job_id = str(job_id)
        if type(state) is not str:
            raise DecodeFailure(f"{host} answered a job whose state is malformed")
        if type(progress) is not int:
            progress = int(progress) if isinstance(progress, float) else -1
        records.append(JobRecord(job_id, collection if type(collection) is str
                                 else str(collection), normalise_state(state), progress))
        if reason:
            reasons[job_id] = failure_text(reason, cluster.api_key)
    count = data.get("count")
    if isinstance(count, bool) or not isinstance(count, int):
        count = None
    return ListingPage(records=tuple(records), count=count, reasons=reasons)


def _number(value: Any) -> int:
    """A whole non-negative number from a JSON field, -1 when absent or malformed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return -1
    return int(value)


def _parse_v1_details(data: dict[str, Any], job_id: str, secret: str) -> JobDetails:
    # readyPercentage is documented as a percentage; whether a server sends 0-1
    # instead is unconfirmed, so it is read as the contract says: 0-100.
    ready = data.get("readyPercentage")
    progress = -1
    if isinstance(ready, (int, float)) and not isinstance(ready, bool) and ready >= 0:
        progress = min(100, round(ready))
    error = data.get("errorMessage")
    return JobDetails(job_id=job_id, progress=progress,
                      reason=failure_text(error, secret) if error else "")


def _parse_v2_details(data: dict[str, Any], job_id: str, secret: str) -> JobDetails:
    state = data.get("state")
    progress = _number(data.get("progress"))
    reason = data.get("reason")
    return JobDetails(job_id=job_id, progress=min(progress, 100),
                      imported_rows=_number(data.get("importedRows")),
                      total_rows=_number(data.get("totalRows")),
                      state=normalise_state(state) if isinstance(state, str) and state else "",
                      reason=failure_text(reason, secret) if reason else "")

"""One API call, for both flavours: a page of the "list import jobs" listing, or the
details of one job ("describe"); and, for discovery, a page of the clusters a key can
see on Zilliz Cloud's control plane ("list clusters").

Each call raises only the ``PollFailure`` tree (exporter.errors), whose ``reason`` is
the contract's poll-error reason, and returns the typed records of exporter.answers.
No message ever holds the API key or a proxy's password: they are built here, never
copied from requests' exceptions, and scrubbed of the key once more before they leave.

HTTP is ``requests``: one ``requests.Session`` per cluster (kept alive, pooled), with
``deadline.DeadlineAdapter`` mounted for what requests cannot do alone (one deadline for
the whole request, pacing, close() from another thread). Answers are streamed, so
``max_response_bytes`` is enforced as they arrive, after gunzip.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import time
import zlib
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from requests.utils import get_environ_proxies
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from exporter import __version__
from exporter.answers import (
    ClustersPage, JobDetails, ListingPage, parse_clusters_answer, parse_describe_answer,
    parse_list_answer,
)
from exporter.config import ClusterConfig, DiscoveryConfig
from exporter.deadline import DeadlineAdapter, Interrupted, finish
from exporter.errors import (
    AuthFailure, ConnectionFailure, DecodeFailure, HttpFailure, PollFailure, TimeoutFailure,
    label_text, scrub,
)
from exporter.logs import bind

log = logging.getLogger("exporter.client")


# Answers are read in pieces of at most this many bytes.
READ_CHUNK_BYTES = 16 * 1024
# An error answer's body up to this size is read away to keep the connection; a larger
# one is not worth it: the connection is dropped.
DRAIN_BYTES = 64 * 1024
# requests reads only the first of these (REQUESTS_CA_BUNDLE); the exporter honours both.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


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
        scrubbed = scrub(str(failure), cluster.api_key)
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
        fired = _discard(response, connection)
        raise _failure(exc, host, timeout, answered=True, fired=fired) from None
    except PollFailure:
        _discard(response, connection)
        raise
    response.raw.release_conn()          # read to its end: the connection carries on
    return answer


def _discard(response: requests.Response, connection: Any) -> bool:
    """Close a connection whose answer went wrong, even one already pooled again: what
    it carries next cannot be trusted. True when the deadline had cut it short."""
    response.close()
    if connection is not None:
        connection.close()
    return finish(response)


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


# ---- discovery: the clusters a key can see ----------------------------------------------

CLUSTERS_PATH = "/v2/clusters"


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



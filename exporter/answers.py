"""The answers' bodies as typed records: a page of jobs, one job's details, a page of
clusters. Every field is checked: a malformed one is reason ``decode``, never an
exception that would escape the poll; server text is made label-safe and scrubbed of
the key it was asked with.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from exporter.config import ClusterConfig
from exporter.errors import ApiFailure, AuthFailure, DecodeFailure, failure_text, label_text
from exporter.jobs import JobRecord, normalise_state

# Body codes that mean the credentials are refused (API-NOTES): v1 80001 "The token is
# illegal" and 80002 "The token is invalid"; v2 21119 "The apikey is illegal." and
# 96014-96017 "no permission for the cluster" (like HTTP 403); Milvus 1800 (with HTTP 401).
AUTH_BODY_CODES = frozenset({80001, 80002, 21119, 96014, 96015, 96016, 96017, 1800})


V1_SUCCESS_CODES = frozenset({200})


# Milvus 2.4.0 to about 2.4.4 answered 200 in v2 bodies; later servers answer 0.
V2_SUCCESS_CODES = frozenset({0, 200})


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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(answer: bytes | bytearray, host: str) -> Any:
    """JSON, strictly: NaN and Infinity are not JSON, and nesting too deep for the
    parser is as malformed as a syntax error."""
    try:
        return json.loads(answer, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise DecodeFailure(f"{host} answered with a body that is not JSON") from None


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

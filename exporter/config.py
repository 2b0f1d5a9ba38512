"""Configuration: YAML files into frozen dataclasses.

Nothing here does I/O beyond reading the files it is given. Every problem is
reported as one line naming the file, the cluster and the key, and no line ever
carries an API key: values of secret keys are never echoed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

REDACTED = "<secret>"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """A configuration was refused; ``lines`` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class PollSettings:
    """Keys allowed under ``defaults`` and overridable per cluster."""

    interval: float = 60.0
    timeout: float = 10.0
    page_size: int = 100
    max_pages: int = 10000
    retries: int = 2
    stuck_after: float = 7200.0
    stall_after: float = 1800.0
    stale_after: float = 300.0
    max_stuck_job_series: int = 100
    max_describes_per_poll: int = 50
    max_job_series: int = 100
    max_failed_job_series: int = 100
    failed_job_window: float = 6 * 3600.0
    requests_per_second: float = 10.0
    max_response_bytes: int = 32 * 1024 * 1024


# key -> (kind, minimum, maximum); durations in seconds.
_SETTING_RULES: dict[str, tuple[str, float, float]] = {
    "interval": ("duration", 1, 86400),
    "timeout": ("duration", 0.1, 3600),
    "page_size": ("int", 1, 100),          # narrowed per flavour: PAGE_SIZE_RANGES
    "max_pages": ("int", 1, 10_000_000),
    "retries": ("int", 0, 10),
    "stuck_after": ("duration", 1, 365 * 86400),
    "stall_after": ("duration", 0, 365 * 86400),
    "stale_after": ("duration", 0, 365 * 86400),
    "max_stuck_job_series": ("int", 0, 100_000),
    # Each describe is one request per job; 0 turns job details off.
    "max_describes_per_poll": ("int", 0, 10_000),
    "max_job_series": ("int", 0, 100_000),
    "max_failed_job_series": ("int", 0, 100_000),
    "failed_job_window": ("duration", 1, 365 * 86400),
    # Zilliz Cloud allows about 20 per second per user and endpoint; 10 leaves room
    # for the key's other users (the import pipeline itself).
    "requests_per_second": ("number", 0.01, 10_000),
    # A larger answer fails the poll (reason decode) instead of filling the memory.
    "max_response_bytes": ("size", 1024, 2 ** 40),
}

# Zilliz Cloud refuses other page sizes: code 80003 (v1) and 96008 (v2).
PAGE_SIZE_RANGES = {"v1": (5, 100), "v2": (1, 100)}


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster to poll; equal configs mean a reload leaves its poller alone."""

    name: str
    url: str
    api: str
    cluster_id: str = ""
    api_key: str = field(default="", repr=False)
    db_name: str = ""
    project_id: str = ""
    region_id: str = ""
    tls_ca_file: str = ""
    tls_insecure_skip_verify: bool = False
    settings: PollSettings = PollSettings()

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass(frozen=True)
class Config:
    path: str
    clusters: tuple[ClusterConfig, ...]
    state_file: str = ""
    defaults: PollSettings = PollSettings()


_CLUSTER_KEYS = {
    "name", "url", "api", "cluster_id", "api_key", "api_key_file", "db_name",
    "project_id", "region_id", "tls_ca_file", "tls_insecure_skip_verify",
} | set(_SETTING_RULES)
_SECRET_KEYS = {"api_key"}


def parse_duration(value: Any) -> float:
    """Parse "30s", "5m", "1h30m", "250ms" or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"bad duration {text!r} (use 30s, 5m, 1h30m or seconds)")
    return total


def parse_size(value: Any) -> int:
    """Parse "512KiB", "32MiB", "1GiB" or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"bad size {value!r} (use 512KiB, 32MiB, 1GiB or bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    if seconds and seconds == int(seconds):
        s = int(seconds)
        parts = [(s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
        return "".join(f"{n}{u}" for n, u in parts if n)
    return f"{seconds:g}s"


class _Problems:
    """Collects one-line errors that all start with the file name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []

    def add(self, where: str, key: str, message: str) -> None:
        scope = f"{where}: " if where else ""
        self.lines.append(f"{self.path}: {scope}key {key!r}: {message}")


def _expand_env(value: Any, environ: Mapping[str, str]) -> Any:
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise KeyError(name)
        return environ[name]

    return _ENV_REF.sub(substitute, value)


def _settings(raw: Mapping[str, Any], base: PollSettings, where: str,
              problems: _Problems) -> PollSettings:
    values: dict[str, Any] = {}
    for key, (kind, low, high) in _SETTING_RULES.items():
        if key not in raw:
            continue
        value = raw[key]
        try:
            if kind == "duration":
                number: float = parse_duration(value)
            elif kind == "size":
                number = parse_size(value)
            elif kind == "number":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"must be a number, got {value!r}")
                number = float(value)
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"must be a whole number, got {value!r}")
                number = value
        except ValueError as exc:
            problems.add(where, key, str(exc))
            continue
        if not low <= number <= high:
            problems.add(where, key, f"{value!r} is out of range ({low:g} to {high:g})")
            continue
        values[key] = number
    return dataclasses.replace(base, **values)


def default_api(url: str) -> str:
    """v1 for the Zilliz control plane (controller.api.*), else v2."""
    host = urlsplit(url).hostname or ""
    return "v1" if host.startswith("controller.api.") else "v2"


def _is_zilliz_cloud(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host.endswith("zillizcloud.com") or host.endswith("cloud.zilliz.com")


def _cluster(raw: Any, index: int, defaults: PollSettings, environ: Mapping[str, str],
             base_dir: str, problems: _Problems) -> ClusterConfig | None:
    where = f"cluster #{index + 1}"
    if not isinstance(raw, dict):
        problems.add(where, "clusters", "each cluster must be a mapping")
        return None
    name = raw.get("name")
    if isinstance(name, str) and name:
        where = f"cluster {name!r}"
    start = len(problems.lines)
    values: dict[str, Any] = {}
    for key in raw:
        if key not in _CLUSTER_KEYS:
            problems.add(where, str(key), "unknown key")
    for key in ("name", "url", "api", "cluster_id", "api_key", "api_key_file", "db_name",
                "project_id", "region_id", "tls_ca_file"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            shown = "" if key in _SECRET_KEYS else f", got {value!r}"
            problems.add(where, key, f"must be a string{shown}")
            continue
        try:
            values[key] = _expand_env(str(value), environ)
        except KeyError as missing:
            problems.add(where, key, f"environment variable ${{{missing.args[0]}}} is not set")
    insecure = raw.get("tls_insecure_skip_verify", False)
    if not isinstance(insecure, bool):
        problems.add(where, "tls_insecure_skip_verify", "must be true or false")
        insecure = False
    settings = _settings(raw, defaults, where, problems)

    name = values.get("name", "")
    if not name:
        if "name" not in raw:
            problems.add(where, "name", "is required")
    elif not _NAME.match(name):
        problems.add(where, "name", f"{name!r} may only hold letters, digits, '_', '.' and '-'")

    url = values.get("url", "")
    if not url:
        if "url" not in raw:
            problems.add(where, "url", "is required")
    else:
        if "://" not in url:
            url = "https://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.add(where, "url", f"{values['url']!r} is not an http(s) URL")
        elif parts.username or parts.password:
            problems.add(where, "url", "must not hold credentials; use api_key")
        url = url.rstrip("/")

    api = values.get("api") or (default_api(url) if url else "v2")
    if api not in ("v1", "v2"):
        problems.add(where, "api", f"{api!r} must be v1 or v2")

    cluster_id = values.get("cluster_id", "")
    if not cluster_id and (api == "v1" or _is_zilliz_cloud(url)):
        problems.add(where, "cluster_id", "is required for Zilliz Cloud")

    api_key = values.get("api_key", "")
    key_file = values.get("api_key_file", "")
    if api_key and key_file:
        problems.add(where, "api_key_file", "set api_key or api_key_file, not both")
    elif key_file:
        path = key_file if os.path.isabs(key_file) else os.path.join(base_dir, key_file)
        try:
            with open(path, encoding="utf-8") as fh:
                api_key = fh.read().rstrip("\r\n")
        except OSError as exc:
            problems.add(where, "api_key_file", f"cannot read {key_file!r}: {exc.strerror}")
        else:
            if not api_key:
                problems.add(where, "api_key_file", f"{key_file!r} is empty")
    elif "api_key" in raw and not api_key:
        problems.add(where, "api_key", "is empty")
    if not api_key and "api_key" not in raw and not key_file and (
            api == "v1" or _is_zilliz_cloud(url)):
        problems.add(where, "api_key", "is required for Zilliz Cloud (or api_key_file)")
    if api in PAGE_SIZE_RANGES:
        low, high = PAGE_SIZE_RANGES[api]
        if not low <= settings.page_size <= high:
            problems.add(where, "page_size", f"{settings.page_size} is out of range for api "
                         f"{api} ({low} to {high}: Zilliz Cloud refuses other page sizes)")
    if api == "v1":
        for key in ("db_name", "project_id", "region_id"):
            if values.get(key):
                problems.add(where, key, "is only used by api v2")
    if bool(values.get("project_id")) != bool(values.get("region_id")):
        problems.add(where, "project_id" if not values.get("project_id") else "region_id",
                     "project_id and region_id go together")
    ca_file = values.get("tls_ca_file", "")
    if ca_file and not os.path.isfile(ca_file if os.path.isabs(ca_file)
                                      else os.path.join(base_dir, ca_file)):
        problems.add(where, "tls_ca_file", f"{ca_file!r} does not exist")
    elif ca_file and not os.path.isabs(ca_file):
        ca_file = os.path.join(base_dir, ca_file)

    if len(problems.lines) != start:
        return None
    return ClusterConfig(
        name=name, url=url, api=api, cluster_id=cluster_id, api_key=api_key,
        db_name=values.get("db_name", ""), project_id=values.get("project_id", ""),
        region_id=values.get("region_id", ""), tls_ca_file=ca_file,
        tls_insecure_skip_verify=insecure, settings=settings,
    )


def parse_config(raw: Any, path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    env = os.environ if environ is None else environ
    problems = _Problems(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the file must hold a mapping with a 'clusters' list"])
    for key in raw:
        if key not in ("defaults", "state_file", "clusters"):
            problems.add("", str(key), "unknown key")
    raw_defaults = raw.get("defaults") or {}
    if not isinstance(raw_defaults, dict):
        problems.add("defaults", "defaults", "must be a mapping")
        raw_defaults = {}
    for key in raw_defaults:
        if key not in _SETTING_RULES:
            problems.add("defaults", str(key), "unknown key")
    defaults = _settings(raw_defaults, PollSettings(), "defaults", problems)
    state_file = raw.get("state_file") or ""
    if not isinstance(state_file, str):
        problems.add("", "state_file", "must be a string")
        state_file = ""
    else:
        try:
            state_file = _expand_env(state_file, env)
        except KeyError as missing:
            problems.add("", "state_file",
                         f"environment variable ${{{missing.args[0]}}} is not set")
    raw_clusters = raw.get("clusters")
    if not isinstance(raw_clusters, list) or not raw_clusters:
        problems.add("", "clusters", "must be a non-empty list")
        raw_clusters = []
    base_dir = os.path.dirname(os.path.abspath(path))
    clusters: list[ClusterConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_clusters):
        cluster = _cluster(item, index, defaults, env, base_dir, problems)
        if cluster is None:
            continue
        if cluster.name in seen:
            problems.add(f"cluster {cluster.name!r}", "name", "is used by another cluster")
            continue
        seen.add(cluster.name)
        clusters.append(cluster)
    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(path=path, clusters=tuple(clusters), state_file=state_file, defaults=defaults)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: not valid YAML{at}: {problem}"]) from None
    return parse_config(raw, path, environ)


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, API keys replaced."""
    def settings(s: PollSettings) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(s):
            value = getattr(s, f.name)
            kind = _SETTING_RULES[f.name][0]
            if kind == "duration":
                value = format_duration(value)
            elif kind == "size":
                value = format_size(value)
            elif kind == "number" and value == int(value):
                value = int(value)        # 10, not 10.0
            out[f.name] = value
        return out

    clusters = []
    for c in config.clusters:
        item: dict[str, Any] = {"name": c.name, "url": c.url, "api": c.api}
        for key in ("cluster_id", "db_name", "project_id", "region_id", "tls_ca_file"):
            if getattr(c, key):
                item[key] = getattr(c, key)
        item["api_key"] = REDACTED if c.api_key else ""
        if c.tls_insecure_skip_verify:
            item["tls_insecure_skip_verify"] = True
        item.update(settings(c.settings))
        clusters.append(item)
    return {"state_file": config.state_file, "defaults": settings(config.defaults),
            "clusters": clusters}


def shared_rate_notes(config: Config) -> list[str]:
    """One line per group of clusters that share a rate limit but configure different rates.

    Clusters with the same host and API key draw from the same token buckets, so the
    lowest of their ``requests_per_second`` applies to all of them.
    """
    groups: dict[tuple[str, str], list[ClusterConfig]] = {}
    for cluster in config.clusters:
        groups.setdefault((cluster.host, cluster.api_key), []).append(cluster)
    notes = []
    for (host, _), members in groups.items():
        rates = {c.settings.requests_per_second for c in members}
        if len(rates) > 1:
            names = ", ".join(repr(c.name) for c in members)
            notes.append(f"{config.path}: clusters {names} share host {host} and API key, "
                         f"so their lowest requests_per_second ({min(rates):g}) applies "
                         f"to all of them")
    return notes


def shard_of(name: str, count: int) -> int:
    """Stable shard for a cluster name: the same in every process and release."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard_index(value: str) -> int:
    """A shard index, or a StatefulSet pod name whose trailing ordinal is the index."""
    match = re.search(r"(\d+)$", value.strip())
    if not match:
        raise ValueError(f"shard index {value!r} is neither a number nor ends in one")
    return int(match.group(1))


# ---- web config (exporter-toolkit format) ------------------------------------------

_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
             "max_version"}
CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
TLS_VERSIONS = ("TLS10", "TLS11", "TLS12", "TLS13")


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = ""


@dataclass(frozen=True)
class WebConfig:
    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)


def load_web_config(path: str) -> WebConfig:
    """Read an exporter-toolkit web config; ConfigError names the offending key."""
    def fail(key: str, message: str) -> ConfigError:
        return ConfigError([f"{path}: key {key!r}: {message}"])

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: not valid YAML"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the file must hold a mapping"])
    base_dir = os.path.dirname(os.path.abspath(path))
    for key in raw:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            raise fail(str(key), "unknown key")
    tls = None
    raw_tls = raw.get("tls_server_config")
    if raw_tls is not None:
        if not isinstance(raw_tls, dict):
            raise fail("tls_server_config", "must be a mapping")
        for key in raw_tls:
            if key not in _TLS_KEYS:
                raise fail(f"tls_server_config.{key}", "unknown key")
        files = {}
        for key in ("cert_file", "key_file", "client_ca_file"):
            value = str(raw_tls.get(key) or "")
            if value and not os.path.isabs(value):
                value = os.path.join(base_dir, value)
            if value and not os.path.isfile(value):
                raise fail(f"tls_server_config.{key}", f"{raw_tls.get(key)!r} does not exist")
            files[key] = value
        for key in ("cert_file", "key_file"):
            if not files[key]:
                raise fail(f"tls_server_config.{key}", "is required")
        auth_type = str(raw_tls.get("client_auth_type") or "NoClientCert")
        if auth_type not in CLIENT_AUTH_TYPES:
            raise fail("tls_server_config.client_auth_type",
                       f"{auth_type!r} must be one of {', '.join(CLIENT_AUTH_TYPES)}")
        if auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") \
                and not files["client_ca_file"]:
            raise fail("tls_server_config.client_ca_file", f"is required by {auth_type}")
        versions = {}
        for key, default in (("min_version", "TLS12"), ("max_version", "")):
            value = str(raw_tls.get(key) or default)
            if value and value not in TLS_VERSIONS:
                raise fail(f"tls_server_config.{key}",
                           f"{value!r} must be one of {', '.join(TLS_VERSIONS)}")
            versions[key] = value
        tls = TLSServerConfig(client_auth_type=auth_type, **files, **versions)
    users = raw.get("basic_auth_users") or {}
    if not isinstance(users, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
        raise fail("basic_auth_users", "must map user names to bcrypt hashes")
    for user, hashed in users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise fail(f"basic_auth_users.{user}", "is not a bcrypt hash")
    headers: dict[str, str] = {}
    http_cfg = raw.get("http_server_config") or {}
    if not isinstance(http_cfg, dict):
        raise fail("http_server_config", "must be a mapping")
    for key in http_cfg:
        if key != "headers":
            raise fail(f"http_server_config.{key}", "unknown key")
    raw_headers = http_cfg.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise fail("http_server_config.headers", "must be a mapping")
    for name, value in raw_headers.items():
        headers[str(name)] = str(value)
    return WebConfig(tls=tls, basic_auth_users=dict(users), headers=headers)

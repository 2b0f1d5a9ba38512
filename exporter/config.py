"""Configuration: YAML files into frozen dataclasses.

Nothing here does I/O beyond reading the files it is given. Every problem is
reported as one line naming the file, the cluster (or discovery source) and the key,
and no line ever carries an API key: values of secret keys are never echoed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import yaml

from exporter.kinds import HEADER_VALUE, expand_env, read_value, shown_value, url_problem

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# The duration and wait histograms' buckets: 30s to 24h, since a small import waits
# seconds and runs minutes, a large one hours.
DEFAULT_DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                            7200.0, 14400.0, 28800.0, 57600.0, 86400.0)


class ConfigError(Exception):
    """A configuration was refused; ``lines`` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def key(kind: str, default: Any = dataclasses.MISSING, low: float = 0, high: float = 0, *,
        secret: bool = False, from_file: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """One config key, declared once as a dataclass field: its parsing, range check,
    secrecy and redaction all follow from ``kind`` and the rest of this metadata.

    kinds: "duration" (seconds), "durations" (a list of seconds, strictly increasing,
    each within the range), "size" (bytes), "int", "number", "string", "bool",
    "proxy" (an http(s) URL whose password is a secret), "strings" (a list of strings,
    held as a tuple), "regex" (a string that compiles).
    ``from_file``: the key may instead be read from the file named by ``<key>_file``.
    """
    return field(default=default, repr=not secret and kind != "proxy", metadata={
        "kind": kind, "range": (low, high), "secret": secret, "from_file": from_file,
        "choices": choices})


def _keys(schema: type) -> dict[str, dataclasses.Field[Any]]:
    """The YAML keys of a schema dataclass: its fields that carry a kind."""
    return {f.name: f for f in dataclasses.fields(schema) if "kind" in f.metadata}


@dataclass(frozen=True)
class PollSettings:
    """Keys allowed under ``defaults`` and overridable per cluster."""

    interval: float = key("duration", 60.0, 1, 86400)
    timeout: float = key("duration", 10.0, 0.1, 3600)
    page_size: int = key("int", 100, 1, 100)            # narrowed per flavour: PAGE_SIZE_RANGES
    max_pages: int = key("int", 10000, 1, 10_000_000)
    retries: int = key("int", 2, 0, 10)
    stuck_after: float = key("duration", 7200.0, 1, 365 * 86400)
    stall_after: float = key("duration", 1800.0, 0, 365 * 86400)
    stale_after: float = key("duration", 300.0, 0, 365 * 86400)
    max_stuck_job_series: int = key("int", 100, 0, 100_000)
    # Each describe is one request per job; 0 turns job details off.
    max_describes_per_poll: int = key("int", 50, 0, 10_000)
    max_job_series: int = key("int", 100, 0, 100_000)
    max_failed_job_series: int = key("int", 100, 0, 100_000)
    failed_job_window: float = key("duration", 6 * 3600.0, 1, 365 * 86400)
    # Zilliz Cloud allows about 20 per second per user and endpoint; 10 leaves room
    # for the key's other users (the import pipeline itself).
    requests_per_second: float = key("number", 10.0, 0.01, 10_000)
    # A larger answer fails the poll (reason decode) instead of filling the memory.
    max_response_bytes: int = key("size", 32 * 1024 * 1024, 1024, 2 ** 40)
    # "" = the environment's HTTPS_PROXY / HTTP_PROXY / NO_PROXY; its password is a secret.
    proxy_url: str = key("proxy", "")
    proxy_from_environment: bool = key("bool", True)
    duration_buckets: tuple[float, ...] = key("durations", DEFAULT_DURATION_BUCKETS, 0.001,
                                              365 * 86400)


SETTING_KEYS = _keys(PollSettings)

# Zilliz Cloud refuses other page sizes: code 80003 (v1) and 96008 (v2).
PAGE_SIZE_RANGES = {"v1": (5, 100), "v2": (1, 100)}

# Zilliz Cloud's control plane (https://api.cloud.zilliz.com.cn in China).
DISCOVERY_URL = "https://api.cloud.zilliz.com"


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster to poll; equal configs mean a reload leaves its poller alone.

    Its keys are those of its fields plus every key of ``PollSettings`` (``settings``).
    """

    name: str = key("string")
    url: str = key("string")
    api: str = key("string", choices=("v1", "v2"))
    cluster_id: str = key("string", "")
    db_name: str = key("string", "")
    project_id: str = key("string", "")
    region_id: str = key("string", "")
    tls_ca_file: str = key("string", "")
    api_key: str = key("string", "", secret=True, from_file=True)
    tls_insecure_skip_verify: bool = key("bool", False)
    settings: PollSettings = PollSettings()
    # Not a YAML key: where the cluster's job history is kept, "" for its name. A
    # discovered cluster's is its clusterId, so a cluster renamed in the console keeps
    # its job ages and its counters' memory.
    history_key: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def history(self) -> str:
        """The key of the cluster's job history (in memory and in ``state_file``)."""
        return self.history_key or self.name


CLUSTER_KEYS = _keys(ClusterConfig)


@dataclass(frozen=True)
class DiscoveryConfig:
    """One discovery source: the clusters an API key can see on Zilliz Cloud's control
    plane. Its keys are those of its fields, and ``settings``, a mapping of any key of
    ``PollSettings`` over ``defaults``, for the source's own requests and for every
    cluster it finds."""

    name: str = key("string")
    url: str = key("string", DISCOVERY_URL)
    api_key: str = key("string", "", secret=True, from_file=True)
    refresh_interval: float = key("duration", 300.0, 1, 86400)
    include: str = key("regex", "")       # full match on clusterName; "" = all
    exclude: str = key("regex", "")
    projects: tuple[str, ...] = key("strings", ())     # projectId values; () = all
    regions: tuple[str, ...] = key("strings", ())      # regionId values; () = all
    poll_statuses: tuple[str, ...] = key("strings", ("RUNNING",))
    settings: PollSettings = PollSettings()

    @property
    def control_plane(self) -> ClusterConfig:
        """The control plane as the API client and the session factory see it: a v2
        API at the source's url, with its key and settings."""
        return ClusterConfig(name=self.name, url=self.url, api="v2", api_key=self.api_key,
                             settings=self.settings)


DISCOVERY_KEYS = _keys(DiscoveryConfig)


@dataclass(frozen=True)
class Config:
    path: str
    clusters: tuple[ClusterConfig, ...]
    state_file: str = ""
    defaults: PollSettings = PollSettings()
    discovery: tuple[DiscoveryConfig, ...] = ()


def _file_keys(keys: Mapping[str, dataclasses.Field[Any]]) -> dict[str, str]:
    """``<key>_file`` -> key, for the keys that may be read from a file (api_key_file)."""
    return {f"{name}_file": name for name, f in keys.items() if f.metadata["from_file"]}


_CLUSTER_FILE_KEYS = _file_keys(CLUSTER_KEYS)
_DISCOVERY_FILE_KEYS = _file_keys(DISCOVERY_KEYS)
# What a cluster's or a source's mapping may hold (settings aside): its keys, and
# ``<key>_file`` for those that may be read from a file, parsed as the key is.
_CLUSTER_YAML_KEYS = {**CLUSTER_KEYS,
                      **{k: CLUSTER_KEYS[v] for k, v in _CLUSTER_FILE_KEYS.items()}}
_DISCOVERY_YAML_KEYS = {**DISCOVERY_KEYS,
                        **{k: DISCOVERY_KEYS[v] for k, v in _DISCOVERY_FILE_KEYS.items()}}


class Problems:
    """Collects one-line errors that all start with the file name (every problem of a
    file is reported at once)."""

    def __init__(self, path: str, lines: list[str] | None = None, prefix: str = "") -> None:
        self.path = path
        self.lines: list[str] = [] if lines is None else lines
        self._prefix = prefix

    def add(self, where: str, key: str, message: str) -> None:
        scope = f"{where}: " if where else ""
        self.lines.append(f"{self.path}: {scope}key {self._prefix + key!r}: {message}")

    def under(self, mapping: str) -> "Problems":
        """The same list, naming keys as ``mapping.key`` (a source's ``settings``)."""
        return Problems(self.path, self.lines, f"{self._prefix}{mapping}.")


def _parse_keys(raw: Mapping[str, Any], keys: Mapping[str, dataclasses.Field[Any]],
                environ: Mapping[str, str], where: str,
                problems: Problems) -> dict[str, Any]:
    """The values of ``keys`` present in ``raw``, each checked by its kind; a null
    string counts as absent."""
    values: dict[str, Any] = {}
    for name, f in keys.items():
        if name not in raw or raw[name] is None and f.metadata["kind"] == "string":
            continue
        try:
            values[name] = read_value(f, raw[name], environ)
        except ValueError as exc:
            problems.add(where, name, str(exc))
    return values


def _unknown_keys(raw: Mapping[str, Any], known: Iterable[str], where: str,
                  problems: Problems) -> None:
    allowed = set(known)
    for name in raw:
        if name not in allowed:
            problems.add(where, str(name), "unknown key")


def _settings(raw: Mapping[str, Any], base: PollSettings, environ: Mapping[str, str],
              where: str, problems: Problems) -> PollSettings:
    return dataclasses.replace(base, **_parse_keys(raw, SETTING_KEYS, environ, where,
                                                   problems))


def default_api(url: str) -> str:
    """v1 for the Zilliz control plane (controller.api.*), else v2."""
    host = urlsplit(url).hostname or ""
    return "v1" if host.startswith("controller.api.") else "v2"


def _is_zilliz_cloud(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host.endswith("zillizcloud.com") or host.endswith("cloud.zilliz.com")


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _read_files(values: dict[str, Any], raw: Mapping[str, Any], base_dir: str, where: str,
                problems: Problems, file_keys: Mapping[str, str] = _CLUSTER_FILE_KEYS) -> None:
    """Read the keys given as ``<key>_file`` and resolve file paths against the config
    file's directory, in place."""
    for file_key, name in file_keys.items():
        path = values.pop(file_key, "")
        if values.get(name) and path:
            problems.add(where, file_key, f"set {name} or {file_key}, not both")
        elif path:
            try:
                with open(_resolve(path, base_dir), encoding="utf-8") as fh:
                    values[name] = fh.read().rstrip("\r\n")
            except OSError as exc:
                problems.add(where, file_key, f"cannot read {path!r}: {exc.strerror}")
            else:
                if not values[name]:
                    problems.add(where, file_key, f"{path!r} is empty")
        elif name in raw and not values.get(name):
            problems.add(where, name, "is empty")
    ca_file = values.get("tls_ca_file", "")
    if ca_file:
        if os.path.isfile(_resolve(ca_file, base_dir)):
            values["tls_ca_file"] = _resolve(ca_file, base_dir)
        else:
            problems.add(where, "tls_ca_file", f"{ca_file!r} does not exist")


def _name_and_url_rules(values: dict[str, Any], raw: Mapping[str, Any], where: str,
                        problems: Problems) -> str:
    """The rules of ``name`` and ``url`` (a cluster's or a source's); fills in the
    url with its scheme, in place, and returns it."""
    name = values.setdefault("name", "")
    if not name:
        if "name" not in raw:
            problems.add(where, "name", "is required")
    elif not _NAME.match(name):
        problems.add(where, "name", f"{name!r} may only hold letters, digits, '_', '.' and '-'")

    url = values.setdefault("url", "")
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
        elif problem := url_problem(parts):
            problems.add(where, "url", f"{values['url']!r} {problem}")
        values["url"] = url = url.rstrip("/")
    if not HEADER_VALUE.fullmatch(values.get("api_key") or ""):   # sent as a header value
        problems.add(where, "api_key", "must be one line of printable ASCII characters")
    return str(url)


def _cluster_rules(values: dict[str, Any], raw: Mapping[str, Any], settings: PollSettings,
                   where: str, problems: Problems) -> None:
    """Rules that span keys: required keys, the URL, the API flavour and what it
    needs. Fills in the derived url and api, in place."""
    url = _name_and_url_rules(values, raw, where, problems)
    api = values["api"] = values.get("api") or (default_api(url) if url else "v2")
    cloud = api == "v1" or _is_zilliz_cloud(url)
    if not values.get("cluster_id") and cloud:
        problems.add(where, "cluster_id", "is required for Zilliz Cloud")
    if not values.get("api_key") and "api_key" not in raw and "api_key_file" not in raw \
            and cloud:
        problems.add(where, "api_key", "is required for Zilliz Cloud (or api_key_file)")
    if api in PAGE_SIZE_RANGES:
        low, high = PAGE_SIZE_RANGES[api]
        if not low <= settings.page_size <= high:
            problems.add(where, "page_size", f"{settings.page_size} is out of range for api "
                         f"{api} ({low} to {high}: Zilliz Cloud refuses other page sizes)")
    if api == "v1":
        for v2_only in ("db_name", "project_id", "region_id"):
            if values.get(v2_only):
                problems.add(where, v2_only, "is only used by api v2")
    if not HEADER_VALUE.fullmatch(values.get("db_name") or ""):    # the DB-Name header
        problems.add(where, "db_name", "must be one line of printable ASCII characters")
    if bool(values.get("project_id")) != bool(values.get("region_id")):
        problems.add(where, "project_id" if not values.get("project_id") else "region_id",
                     "project_id and region_id go together")


def _where(raw: Any, index: int, kind: str, list_key: str, problems: Problems) -> str | None:
    """How problems name an item of a list (by its name once it has one); None, and a
    problem, when the item is no mapping."""
    where = f"{kind} #{index + 1}"
    if not isinstance(raw, dict):
        problems.add(where, list_key, f"each {kind} must be a mapping")
        return None
    if isinstance(raw.get("name"), str) and raw["name"]:
        where = f"{kind} {raw['name']!r}"
    return where


def _cluster(raw: Any, index: int, defaults: PollSettings, environ: Mapping[str, str],
             base_dir: str, problems: Problems) -> ClusterConfig | None:
    """One cluster: parse its keys, read its files, apply the cross-key rules."""
    where = _where(raw, index, "cluster", "clusters", problems)
    if where is None:
        return None
    start = len(problems.lines)
    _unknown_keys(raw, [*_CLUSTER_YAML_KEYS, *SETTING_KEYS], where, problems)
    values = _parse_keys(raw, _CLUSTER_YAML_KEYS, environ, where, problems)
    settings = _settings(raw, defaults, environ, where, problems)
    _read_files(values, raw, base_dir, where, problems)
    _cluster_rules(values, raw, settings, where, problems)
    if len(problems.lines) != start:
        return None
    return ClusterConfig(**values, settings=settings)


def _source(raw: Any, index: int, defaults: PollSettings, environ: Mapping[str, str],
            base_dir: str, problems: Problems) -> DiscoveryConfig | None:
    """One discovery source: its keys, its key file, its ``settings`` over defaults."""
    where = _where(raw, index, "discovery source", "discovery", problems)
    if where is None:
        return None
    start = len(problems.lines)
    _unknown_keys(raw, [*_DISCOVERY_YAML_KEYS, "settings"], where, problems)
    values = _parse_keys(raw, _DISCOVERY_YAML_KEYS, environ, where, problems)
    raw_settings = raw.get("settings") or {}
    if not isinstance(raw_settings, dict):
        problems.add(where, "settings", "must be a mapping of keys of defaults")
        raw_settings = {}
    in_settings = problems.under("settings")
    _unknown_keys(raw_settings, SETTING_KEYS, where, in_settings)
    settings = _settings(raw_settings, defaults, environ, where, in_settings)
    _read_files(values, raw, base_dir, where, problems, _DISCOVERY_FILE_KEYS)
    values.setdefault("url", DISCOVERY_URL)
    _name_and_url_rules(values, raw, where, problems)
    if not values.get("api_key") and "api_key" not in raw and "api_key_file" not in raw:
        problems.add(where, "api_key", "is required (or api_key_file)")
    if len(problems.lines) != start:
        return None
    return DiscoveryConfig(**values, settings=settings)


def _named(items: list[Any], parse: Callable[[Any, int], Any], kind: str,
           problems: Problems) -> list[Any]:
    """Parse each item; a name used twice is a problem."""
    parsed: list[Any] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        value = parse(item, index)
        if value is None:
            continue
        if value.name in seen:
            problems.add(f"{kind} {value.name!r}", "name", f"is used by another {kind}")
            continue
        seen.add(value.name)
        parsed.append(value)
    return parsed


def parse_config(raw: Any, path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    env = os.environ if environ is None else environ
    problems = Problems(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the file must hold a mapping with a 'clusters' list"])
    _unknown_keys(raw, ("defaults", "state_file", "discovery", "clusters"), "", problems)
    raw_defaults = raw.get("defaults") or {}
    if not isinstance(raw_defaults, dict):
        problems.add("defaults", "defaults", "must be a mapping")
        raw_defaults = {}
    _unknown_keys(raw_defaults, SETTING_KEYS, "defaults", problems)
    defaults = _settings(raw_defaults, PollSettings(), env, "defaults", problems)
    state_file = raw.get("state_file") or ""
    if not isinstance(state_file, str):
        problems.add("", "state_file", "must be a string")
        state_file = ""
    else:
        try:
            state_file = expand_env(state_file, env)
        except KeyError as missing:
            problems.add("", "state_file",
                         f"environment variable ${{{missing.args[0]}}} is not set")
    raw_sources = raw.get("discovery") or []
    if not isinstance(raw_sources, list):
        problems.add("", "discovery", "must be a list of discovery sources")
        raw_sources = []
    raw_clusters = raw.get("clusters") or []
    if not isinstance(raw_clusters, list) or not raw_clusters and not raw_sources:
        problems.add("", "clusters", "must be a non-empty list (it may be empty when "
                     "discovery lists a source)")
        raw_clusters = []
    base_dir = os.path.dirname(os.path.abspath(path))
    sources = _named(raw_sources, lambda item, index: _source(
        item, index, defaults, env, base_dir, problems), "discovery source", problems)
    clusters = _named(raw_clusters, lambda item, index: _cluster(
        item, index, defaults, env, base_dir, problems), "cluster", problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(path=path, clusters=tuple(clusters), state_file=state_file, defaults=defaults,
                  discovery=tuple(sources))


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
    """The effective configuration as plain data, secrets replaced. Empty optional
    strings and false flags are left out; secrets and settings are always shown."""
    def settings(s: PollSettings) -> dict[str, Any]:
        return {name: shown_value(f, getattr(s, name)) for name, f in SETTING_KEYS.items()}

    def shown(item: ClusterConfig | DiscoveryConfig,
              keys: Mapping[str, dataclasses.Field[Any]]) -> dict[str, Any]:
        return {name: shown_value(f, getattr(item, name)) for name, f in keys.items()
                if getattr(item, name) or f.metadata["secret"]
                or f.default is dataclasses.MISSING}

    out: dict[str, Any] = {"state_file": config.state_file,
                           "defaults": settings(config.defaults)}
    if config.discovery:
        out["discovery"] = [{**shown(s, DISCOVERY_KEYS), "settings": settings(s.settings)}
                            for s in config.discovery]
    out["clusters"] = [{**shown(c, CLUSTER_KEYS), **settings(c.settings)}
                       for c in config.clusters]
    return out


def shared_rate_notes(config: Config) -> list[str]:
    """One line per group of clusters that share a rate limit but configure different rates.

    Clusters (and discovery sources) with the same host and API key draw from the same
    token buckets, so the lowest of their ``requests_per_second`` applies to all of them.
    """
    groups: dict[tuple[str, str], list[ClusterConfig]] = {}
    for cluster in (*config.clusters, *(s.control_plane for s in config.discovery)):
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

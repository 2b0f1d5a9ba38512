from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from exporter import __version__
from exporter.config import (
    SETTING_KEYS, ConfigError, load_config, parse_config, redacted, shared_rate_notes,
)
from exporter.kinds import format_duration, format_size, parse_duration, parse_size

SECRET = "sk-config-test-7f3a9c2e1d"


def write(tmp_path: Path, doc: object, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def cluster(**over: object) -> dict:
    base = {"name": "prod", "url": "https://controller.api.gcp-us-west1.zillizcloud.com",
            "cluster_id": "in01-abc", "api_key": SECRET}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def errors(tmp_path: Path, doc: object, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, doc), environ=env or {})
    for line in info.value.lines:
        assert "\n" not in line
        assert SECRET not in line
    return info.value.lines


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("90", 90), (45, 45),
    ("250ms", 0.25), ("1.5s", 1.5), ("1d", 86400)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "m5", "1h30", "", "1h 30m", "-5s", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_overridden_per_cluster_and_api_guessed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {
        "defaults": {"interval": "30s", "page_size": 50, "stuck_after": "1h"},
        "clusters": [cluster(), cluster(name="v2", url="api.cloud.zilliz.com",
                                        interval="2m"),
                     {"name": "milvus", "url": "http://milvus:19530", "api_key": "root:pw"}],
    }), environ={})
    v1, v2, milvus = config.clusters
    assert (v1.api, v1.settings.interval, v1.settings.page_size) == ("v1", 30, 50)
    assert (v2.api, v2.settings.interval, v2.settings.stuck_after) == ("v2", 120, 3600)
    assert v2.url == "https://api.cloud.zilliz.com"  # no scheme means https
    assert (milvus.api, milvus.cluster_id, milvus.host) == ("v2", "", "milvus:19530")
    assert v1.settings.retries == 2 and v1.settings.stall_after == 1800  # contract defaults
    assert (v1.settings.max_describes_per_poll, v1.settings.max_job_series,
            v1.settings.max_failed_job_series, v1.settings.failed_job_window) == \
        (50, 100, 100, 6 * 3600)


def test_job_detail_keys_parse_and_zero_turns_describing_off(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {
        "defaults": {"max_describes_per_poll": 0, "failed_job_window": "1h30m"},
        "clusters": [cluster(max_job_series=5, max_failed_job_series=7,
                             max_describes_per_poll=20), cluster(name="other")]}),
        environ={})
    first, other = config.clusters
    assert (first.settings.max_describes_per_poll, first.settings.max_job_series,
            first.settings.max_failed_job_series) == (20, 5, 7)
    assert (other.settings.max_describes_per_poll, other.settings.failed_job_window) == \
        (0, 5400)
    assert redacted(config)["defaults"]["failed_job_window"] == "1h30m"


def test_duration_buckets_default_and_override_per_cluster(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {
        "defaults": {"duration_buckets": ["10s", "1m", "1h30m"]},
        "clusters": [cluster(), cluster(name="b", duration_buckets=[5, "2h"])]}), environ={})
    first, second = config.clusters
    assert first.settings.duration_buckets == (10.0, 60.0, 5400.0)
    assert second.settings.duration_buckets == (5.0, 7200.0)
    assert redacted(config)["clusters"][1]["duration_buckets"] == ["5s", "2h"]
    plain = parse_config({"clusters": [cluster()]}, "x.yaml", environ={})
    assert [format_duration(b) for b in plain.defaults.duration_buckets] == [
        "30s", "1m", "2m", "5m", "10m", "20m", "30m", "1h", "2h", "4h", "8h", "16h", "24h"]


def test_env_and_key_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET + "\n")
    config = load_config(write(tmp_path, {"clusters": [
        cluster(api_key="${ZKEY}"), cluster(name="b", api_key=None, api_key_file="key")]}),
        environ={"ZKEY": "from-env"})
    assert config.clusters[0].api_key == "from-env"
    assert config.clusters[1].api_key == SECRET  # trailing newline dropped
    assert SECRET not in repr(config)


@pytest.mark.parametrize("doc,expected", [
    ({"clusters": [cluster(colour="blue")]}, "cluster 'prod': key 'colour': unknown key"),
    ({"clusters": [cluster()], "extra": 1}, "key 'extra': unknown key"),
    ({"defaults": {"intervl": "1s"}, "clusters": [cluster()]},
     "defaults: key 'intervl': unknown key"),
    ({"clusters": [cluster(), cluster()]}, "cluster 'prod': key 'name': is used by another"),
    ({"clusters": [cluster(name=None)]}, "cluster #1: key 'name': is required"),
    ({"clusters": [cluster(url=None)]}, "cluster 'prod': key 'url': is required"),
    ({"clusters": [cluster(cluster_id=None)]}, "key 'cluster_id': is required"),
    ({"clusters": [cluster(api_key=None)]}, "key 'api_key': is required"),
    ({"clusters": [cluster(api_key="${NOPE}")]},
     "cluster 'prod': key 'api_key': environment variable ${NOPE} is not set"),
    ({"clusters": [cluster(interval="5x")]}, "cluster 'prod': key 'interval': bad duration"),
    ({"clusters": [cluster(page_size=0)]}, "key 'page_size': 0 is out of range"),
    ({"clusters": [cluster(retries=99)]}, "key 'retries': 99 is out of range"),
    # Zilliz Cloud's own limits: 5-100 on v1 (code 80003), 1-100 on v2 (code 96008)
    ({"clusters": [cluster(page_size=4)]},
     "cluster 'prod': key 'page_size': 4 is out of range for api v1 (5 to 100"),
    ({"defaults": {"page_size": 3}, "clusters": [cluster()]},
     "cluster 'prod': key 'page_size': 3 is out of range for api v1"),
    ({"clusters": [cluster(api="v2", page_size=101)]}, "key 'page_size': 101 is out of range"),
    ({"clusters": [cluster(requests_per_second=0)]},
     "cluster 'prod': key 'requests_per_second': 0 is out of range"),
    ({"defaults": {"requests_per_second": "fast"}, "clusters": [cluster()]},
     "defaults: key 'requests_per_second': must be a number"),
    ({"clusters": [cluster(max_pages="lots")]}, "key 'max_pages': must be a whole number"),
    ({"defaults": {"timeout": "0s"}, "clusters": [cluster()]},
     "defaults: key 'timeout': '0s' is out of range"),
    ({"clusters": [cluster(api="v3")]}, "key 'api': 'v3' must be v1 or v2"),
    ({"clusters": [cluster(name="bad name")]}, "key 'name': 'bad name' may only hold"),
    ({"clusters": [cluster(url="ftp://x")]}, "key 'url': 'ftp://x' is not an http(s) URL"),
    ({"clusters": [cluster(api_key_file="/nonexistent")]}, "not both"),
    ({"clusters": [cluster(api_key=None, api_key_file="/nonexistent")]},
     "key 'api_key_file': cannot read"),
    ({"clusters": [cluster(db_name="x")]}, "key 'db_name': is only used by api v2"),
    ({"clusters": [cluster(tls_insecure_skip_verify="yes")]}, "must be true or false"),
    ({"clusters": [cluster(tls_ca_file="/no/ca.pem")]}, "key 'tls_ca_file'"),
    ({"clusters": []}, "key 'clusters': must be a non-empty list"),
    ({"clusters": [cluster(max_describes_per_poll=-1)]},
     "cluster 'prod': key 'max_describes_per_poll': -1 is out of range"),
    ({"defaults": {"failed_job_window": "soon"}, "clusters": [cluster()]},
     "defaults: key 'failed_job_window': bad duration"),
    ({"clusters": [cluster(max_job_series="many")]}, "key 'max_job_series': must be a whole"),
    # header values: a line break would start a header of the key's choosing
    ({"clusters": [cluster(api_key="k\r\nX-Evil: 1")]},
     "cluster 'prod': key 'api_key': must be one line of printable ASCII characters"),
    ({"clusters": [cluster(url="https://h:99999")]},
     "key 'url': 'https://h:99999' has a port that is not a number from 1 to 65535"),
    ({"clusters": [cluster(url="https://h/my path")]}, "may have a path of printable ASCII"),
    ({"clusters": [cluster(api="v2", db_name="datenbank-ä")]},
     "cluster 'prod': key 'db_name': must be one line of printable ASCII"),
    ({"clusters": [cluster(duration_buckets=["30s", "2m", "1m"])]},
     "cluster 'prod': key 'duration_buckets': must be strictly increasing: '1m' comes "
     "after '2m'"),
    ({"clusters": [cluster(duration_buckets=["1m", "60s"])]},
     "key 'duration_buckets': must be strictly increasing: '60s' comes after '1m'"),
    ({"defaults": {"duration_buckets": "5m"}, "clusters": [cluster()]},
     "defaults: key 'duration_buckets': must be a non-empty list of durations"),
    ({"clusters": [cluster(duration_buckets=[])]}, "must be a non-empty list"),
    ({"clusters": [cluster(duration_buckets=["1m", "soon"])]},
     "cluster 'prod': key 'duration_buckets': bad duration 'soon'"),
    ({"clusters": [cluster(duration_buckets=[0, 5])]},
     "key 'duration_buckets': 0 is out of range"),
    ({"clusters": [cluster(duration_buckets=list(range(1, 42)))]},
     "key 'duration_buckets': has 41 values, more than 40"),
])
def test_each_rule_is_one_line_naming_file_cluster_and_key(
        tmp_path: Path, doc: dict, expected: str) -> None:
    one_line_naming(tmp_path, doc, expected)


def one_line_naming(tmp_path: Path, doc: dict, expected: str) -> None:
    """The file is refused, with ``expected`` in one of its lines, each naming the file."""
    lines = errors(tmp_path, doc)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith(str(tmp_path / "config.yaml") + ": ") for line in lines)


def test_page_size_ranges_per_flavour(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"defaults": {"page_size": 1}, "clusters": [
        {"name": "milvus", "url": "http://milvus:19530", "api_key": "root:pw"},
        cluster(page_size=5), cluster(name="v2", api="v2", page_size=100)]}), environ={})
    assert [c.settings.page_size for c in config.clusters] == [1, 5, 100]


def test_requests_per_second_and_lowest_shared_rate_is_noted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"defaults": {"requests_per_second": 18}, "clusters": [
        cluster(), cluster(name="b", cluster_id="in01-b", requests_per_second=2.5),
        cluster(name="c", cluster_id="in01-c", api_key="other-key", requests_per_second=1),
    ]}), environ={})
    assert [c.settings.requests_per_second for c in config.clusters] == [18, 2.5, 1]
    notes = shared_rate_notes(config)
    assert len(notes) == 1 and "'prod', 'b'" in notes[0] and "(2.5)" in notes[0]
    assert SECRET not in notes[0] and "'c'" not in notes[0]
    assert "requests_per_second: 18" in yaml.safe_dump(redacted(config))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    lines = errors(tmp_path, {"clusters": [cluster(interval="x", retries=-1),
                                           cluster(name="b", api="v9")]})
    assert len(lines) == 3


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid YAML at line 2: mapping values" in errors(tmp_path, "clusters:\n  - a: b: c\n")[0]
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_redacted_output_hides_keys(tmp_path: Path) -> None:
    config = parse_config({"clusters": [cluster()]}, "x.yaml", environ={})
    text = yaml.safe_dump(redacted(config))
    assert SECRET not in text
    assert "api_key: <secret>" in text and "interval: 1m" in text


def test_check_config_cli(tmp_path: Path) -> None:
    good = write(tmp_path, {"clusters": [cluster()]})
    result = run_cli("--check-config", "-c", good)
    assert result.returncode == 0, result.stderr
    assert "prod" in result.stdout and SECRET not in result.stdout + result.stderr
    bad = write(tmp_path, {"clusters": [cluster(interval="soon")]}, "bad.yaml")
    result = run_cli("--check-config", "-c", bad)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "bad.yaml: cluster 'prod': key 'interval'" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("--no-such-flag").returncode == 2
    assert run_cli("--web.listen-address", "nope", "-c", "x").returncode == 2
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"zilliz-import-exporter {__version__}\n"


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    key = tmp_path / "zilliz"
    key.write_text("k\n")
    text = (ROOT / "config.example.yaml").read_text().replace("/run/secrets/zilliz", str(key))
    config = load_config(write(tmp_path, text),
                         environ={"ZILLIZ_API_KEY": "a", "MILVUS_USER": "u",
                                  "MILVUS_PASSWORD": "p"})
    assert [(c.name, c.api) for c in config.clusters] == \
        [("prod-search", "v1"), ("prod-recs", "v2"), ("onprem-milvus", "v2")]
    assert config.clusters[2].api_key == "u:p" and config.clusters[1].settings.interval == 120
    (prod,) = config.discovery
    assert (prod.name, prod.api_key, prod.exclude, prod.settings.interval) == \
        ("prod", "a", ".*-scratch", 120)


@pytest.mark.parametrize("text,size", [
    ("512KiB", 512 * 1024), ("32MiB", 32 * 1024 ** 2), ("1GiB", 1024 ** 3), (4096, 4096),
    ("4096", 4096), ("1.5KiB", 1536), ("2MiB", 2 * 1024 ** 2)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["32 MiBs", "MiB", "", "-1KiB", "0.5B", True])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_sizes_print_in_the_largest_exact_binary_unit() -> None:
    assert [format_size(n) for n in (32 * 1024 ** 2, 1536, 1024 ** 3, 1000, 0)] == \
        ["32MiB", "1536", "1GiB", "1000", "0"]


def test_every_key_reads_back_from_check_config_output() -> None:
    """--check-config prints every key (secrets aside) in a form the loader accepts:
    a key declared in the schema is parsed, ranged and printed by its kind."""
    settings = {"interval": "1h30m", "timeout": "2.5s", "page_size": 50, "max_pages": 7,
                "retries": 0, "stuck_after": "3h", "stall_after": 0, "stale_after": "90s",
                "max_stuck_job_series": 3, "max_describes_per_poll": 0, "max_job_series": 4,
                "max_failed_job_series": 5, "failed_job_window": "1d",
                "requests_per_second": 2.5, "max_response_bytes": "512KiB",
                "proxy_url": "http://proxy.internal:3128", "proxy_from_environment": False,
                "duration_buckets": ["0.5s", "1m30s", "2h", "365d"]}
    assert set(settings) == set(SETTING_KEYS)
    config = parse_config({"defaults": settings, "clusters": [
        cluster(tls_insecure_skip_verify=True, retries=1),
        cluster(name="v2", url="api.cloud.zilliz.com", db_name="d", project_id="p",
                region_id="r", api="v2", requests_per_second=3)]}, "x.yaml", environ={})
    shown = redacted(config)
    assert SECRET not in str(shown)
    for item in shown["clusters"]:
        assert item["api_key"] == "<secret>"
        item["api_key"] = SECRET
    assert parse_config(shown, "x.yaml", environ={}) == config


# ---- max_response_bytes: the "size" kind -------------------------------------------

def load_size(value: object) -> int:
    raw = {"defaults": {"max_response_bytes": value},
           "clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2"}]}
    config = parse_config(raw, "x.yaml", environ={})
    return config.clusters[0].settings.max_response_bytes


def test_default_is_32_mib_and_check_config_shows_units() -> None:
    raw = {"clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2",
                         "max_response_bytes": "512KiB"}]}
    config = parse_config(raw, "x.yaml", environ={})
    assert redacted(config)["clusters"][0]["max_response_bytes"] == "512KiB"
    assert config.defaults.max_response_bytes == 32 * 1024 ** 2


@pytest.mark.parametrize("value,message", [
    ("32MB", "bad size '32MB'"), ("lots", "bad size"), (True, "not a size"),
    (10, "out of range"), ("-1KiB", "bad size")])
def test_bad_max_response_bytes_names_the_file_and_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_size(value)
    line = str(error.value)
    assert line.startswith("x.yaml:") and "'max_response_bytes'" in line and message in line


# ---- discovery sources -------------------------------------------------------------

def source(**over: object) -> dict:
    base = {"name": "prod", "api_key": SECRET}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_the_smallest_discovery_config_needs_no_cluster(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"defaults": {"interval": "30s"},
                                          "discovery": [source()]}), environ={})
    (prod,) = config.discovery
    assert config.clusters == ()
    assert (prod.name, prod.url, prod.api_key, prod.refresh_interval) == \
        ("prod", "https://api.cloud.zilliz.com", SECRET, 300)
    assert (prod.include, prod.exclude, prod.projects, prod.regions, prod.poll_statuses) == \
        ("", "", (), (), ("RUNNING",))
    assert prod.settings.interval == 30 and prod.settings.page_size == 100
    plane = prod.control_plane        # what the client and the session factory see
    assert (plane.url, plane.api, plane.api_key, plane.host) == \
        (prod.url, "v2", SECRET, "api.cloud.zilliz.com")
    assert SECRET not in repr(config)


def test_a_source_takes_every_key_and_settings_over_defaults(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET + "\n")
    config = load_config(write(tmp_path, {
        "defaults": {"interval": "30s", "stuck_after": "1h"},
        "discovery": [source(name="cn", url="api.cloud.zilliz.com.cn", api_key=None,
                             api_key_file="key", refresh_interval="1m",
                             include="prod-.*", exclude=".*-tmp", projects=["proj-1"],
                             regions=["ali-cn-hangzhou"], poll_statuses=["RUNNING", "RESUMING"],
                             settings={"interval": "2m", "requests_per_second": 5})],
        "clusters": [cluster()]}), environ={})
    (cn,) = config.discovery
    assert (cn.url, cn.api_key, cn.refresh_interval, cn.include, cn.exclude) == \
        ("https://api.cloud.zilliz.com.cn", SECRET, 60, "prod-.*", ".*-tmp")
    assert (cn.projects, cn.regions, cn.poll_statuses) == \
        (("proj-1",), ("ali-cn-hangzhou",), ("RUNNING", "RESUMING"))
    assert (cn.settings.interval, cn.settings.stuck_after, cn.settings.requests_per_second) \
        == (120, 3600, 5)


@pytest.mark.parametrize("doc,expected", [
    ({"discovery": [source(name=None)]}, "discovery source #1: key 'name': is required"),
    ({"discovery": [source(colour="blue")]},
     "discovery source 'prod': key 'colour': unknown key"),
    ({"discovery": [source(), source()]},
     "discovery source 'prod': key 'name': is used by another discovery source"),
    ({"discovery": [source(api_key=None)]},
     "discovery source 'prod': key 'api_key': is required (or api_key_file)"),
    ({"discovery": [source(api_key="${NOPE}")]},
     "discovery source 'prod': key 'api_key': environment variable ${NOPE} is not set"),
    ({"discovery": [source(include="prod-(")]},
     "discovery source 'prod': key 'include': 'prod-(' is not a regular expression"),
    ({"discovery": [source(projects="proj-1")]},
     "discovery source 'prod': key 'projects': must be a list of strings"),
    ({"discovery": [source(poll_statuses=[["RUNNING"]])]},
     "discovery source 'prod': key 'poll_statuses': must be a string"),
    ({"discovery": [source(refresh_interval="often")]},
     "discovery source 'prod': key 'refresh_interval': bad duration"),
    ({"discovery": [source(settings={"interval": "5x"})]},
     "discovery source 'prod': key 'settings.interval': bad duration"),
    ({"discovery": [source(settings={"colour": 1})]},
     "discovery source 'prod': key 'settings.colour': unknown key"),
    ({"discovery": [source(settings=[1])]},
     "discovery source 'prod': key 'settings': must be a mapping"),
    ({"discovery": [source(interval="1m")]},
     "discovery source 'prod': key 'interval': unknown key"),
    ({"discovery": [source(url="ftp://x")]},
     "discovery source 'prod': key 'url': 'ftp://x' is not an http(s) URL"),
    ({"discovery": [source(api_key="k\r\nX-Evil: 1")]},
     "discovery source 'prod': key 'api_key': must be one line of printable ASCII"),
    ({"discovery": {"name": "prod"}}, "key 'discovery': must be a list"),
    ({"discovery": ["prod"]}, "discovery source #1: key 'discovery': each discovery source"),
    ({"discovery": []}, "key 'clusters': must be a non-empty list"),
])
def test_each_source_rule_is_one_line_naming_file_source_and_key(
        tmp_path: Path, doc: dict, expected: str) -> None:
    one_line_naming(tmp_path, doc, expected)


def test_check_config_shows_sources_with_their_keys_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, {"discovery": [source(settings={"interval": "90s"},
                                                 projects=["p"])],
                            "clusters": [cluster()]})
    result = run_cli("--check-config", "-c", path)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    (shown,) = yaml.safe_load(result.stdout)["discovery"]
    assert shown["api_key"] == "<secret>" and shown["projects"] == ["p"]
    assert shown["poll_statuses"] == ["RUNNING"] and shown["refresh_interval"] == "5m"
    assert shown["settings"]["interval"] == "1m30s"
    config = load_config(path, environ={})
    shown["api_key"] = SECRET                     # the shown source reads back as itself
    for item in (again := redacted(config))["clusters"]:
        item["api_key"] = SECRET
    again["discovery"] = [shown]
    assert parse_config(again, path, environ={}) == config


def test_sources_count_in_the_shared_rate_note(tmp_path: Path) -> None:
    config = parse_config({"discovery": [source(settings={"requests_per_second": 2})],
                           "clusters": [cluster(name="a", url="https://api.cloud.zilliz.com",
                                                api="v2")]}, "x.yaml", environ={})
    (note,) = shared_rate_notes(config)
    assert "'a', 'prod'" in note and "(2)" in note and SECRET not in note


# ---- proxy_url: the "proxy" kind, whose password is a secret ---------------------------

PROXY_PASSWORD = "pr0xy-s3cret-77"


def test_a_proxy_password_is_redacted_and_the_rest_of_the_url_shown() -> None:
    raw = {"defaults": {"proxy_url": "http://ops:${PROXY_PASSWORD}@proxy.corp:3128"},
           "clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2",
                         "proxy_from_environment": False}]}
    config = parse_config(raw, "x.yaml", environ={"PROXY_PASSWORD": PROXY_PASSWORD})
    assert config.defaults.proxy_url == f"http://ops:{PROXY_PASSWORD}@proxy.corp:3128"
    assert config.clusters[0].settings.proxy_url.endswith("@proxy.corp:3128")
    shown = redacted(config)
    assert shown["clusters"][0]["proxy_url"] == "http://ops:<secret>@proxy.corp:3128"
    assert shown["clusters"][0]["proxy_from_environment"] is False
    assert PROXY_PASSWORD not in str(shown) and PROXY_PASSWORD not in repr(config)


@pytest.mark.parametrize("value,message", [
    (f"socks5://u:{PROXY_PASSWORD}@h:1080", "must be an http:// or https:// URL"),
    (f"http://u:{PROXY_PASSWORD}@h:99999", "valid host and port"),
    ("proxy.corp:3128", "must be an http:// or https:// URL"), (3128, "must be a string")])
def test_a_bad_proxy_url_is_one_line_that_never_echoes_it(value: object,
                                                          message: str) -> None:
    raw = {"clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2",
                         "proxy_url": value}]}
    with pytest.raises(ConfigError) as error:
        parse_config(raw, "x.yaml", environ={})
    (line,) = error.value.lines
    assert line.startswith("x.yaml: cluster 'a': key 'proxy_url': ") and message in line
    assert PROXY_PASSWORD not in line

"""max_response_bytes: the "size" kind of setting."""

from __future__ import annotations

import pytest

from exporter.config import ConfigError, parse_config, redacted


def load(value: object) -> int:
    raw = {"defaults": {"max_response_bytes": value},
           "clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2"}]}
    config = parse_config(raw, "x.yaml", environ={})
    return config.clusters[0].settings.max_response_bytes


@pytest.mark.parametrize("value,size", [
    ("512KiB", 512 * 1024), ("32MiB", 32 * 1024 ** 2), ("1GiB", 1024 ** 3),
    (4096, 4096), ("4096", 4096), ("2 MiB", 2 * 1024 ** 2)])
def test_sizes(value: object, size: int) -> None:
    assert load(value) == size


def test_default_is_32_mib_and_check_config_shows_units() -> None:
    raw = {"clusters": [{"name": "a", "url": "http://127.0.0.1:9", "api": "v2",
                         "max_response_bytes": "512KiB"}]}
    config = parse_config(raw, "x.yaml", environ={})
    assert redacted(config)["clusters"][0]["max_response_bytes"] == "512KiB"
    assert config.defaults.max_response_bytes == 32 * 1024 ** 2


@pytest.mark.parametrize("value,message", [
    ("32MB", "bad size '32MB'"), ("lots", "bad size"), (True, "not a size"),
    (10, "out of range"), ("-1KiB", "bad size")])
def test_bad_sizes_name_the_file_and_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(value)
    line = str(error.value)
    assert line.startswith("x.yaml:") and "'max_response_bytes'" in line and message in line

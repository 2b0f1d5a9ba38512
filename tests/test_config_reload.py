"""--config.auto-reload-interval: the exporter follows its config file's content, including
the symlink swap by which the kubelet updates a mounted ConfigMap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import fast_defaults, job_counts, samples
from exporter.cli import ConfigWatcher, parse_reload_interval

RELOAD_OK = ("zilliz_import_config_last_reload_successful", ())


def test_reload_interval_flag() -> None:
    assert parse_reload_interval("0") == 0
    assert parse_reload_interval("30s") == 30
    assert parse_reload_interval("1m") == 60
    for bad in ("-1s", "soon"):
        with pytest.raises(ValueError, match="--config.auto-reload-interval"):
            parse_reload_interval(bad)


def test_watcher_reloads_once_per_new_content(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    reloads: list[str] = []

    def reload() -> None:
        reloads.append(path.read_text())
    watcher = ConfigWatcher(str(path), 30)
    assert not watcher.check(reload)            # unchanged
    path.write_text("a: 1\n")                   # rewritten, same content: not a change
    assert not watcher.check(reload)
    path.write_text("a: 2\n")
    assert watcher.check(reload) and reloads == ["a: 2\n"]
    assert not watcher.check(reload)            # reloaded once, not on every check
    path.unlink()                               # gone (mid-swap): nothing happens
    assert not watcher.check(reload)
    path.write_text("a: 2\n")                   # back with the content already applied
    assert not watcher.check(reload) and reloads == ["a: 2\n"]


class KubeletVolume:
    """A ConfigMap volume as the kubelet lays it out: config.yaml -> ..data/config.yaml,
    ..data -> a timestamped directory; an update writes a new directory and renames a
    new ..data symlink over the old one, so the file is replaced in one step."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "config.yaml").symlink_to("..data/config.yaml")

    def publish(self, config: dict[str, Any]) -> None:
        self.generation += 1
        data = self.root / f"..2026_11_29_00_00_0{self.generation}.000000000"
        data.mkdir()
        (data / "config.yaml").write_text(yaml.safe_dump(config))
        (self.root / "..data_tmp").symlink_to(data.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")

    @property
    def current(self) -> Path:
        return (self.root / "..data").resolve() / "config.yaml"


def test_auto_reload_follows_a_symlink_swap_and_an_edit(simulator, exporter,
                                                        tmp_path: Path) -> None:
    for name in ("first", "second"):
        simulator.add_cluster(name, "v2").add_jobs(2, name, "importing")

    def config(*names: str, **defaults: Any) -> dict[str, Any]:
        return {"defaults": fast_defaults(**defaults),
                "clusters": [simulator.cluster_config(n) for n in names]}
    volume = KubeletVolume(tmp_path)
    volume.publish(config("first"))
    proc = exporter(None, "--config.auto-reload-interval=100ms")
    proc.wait_for_metrics(lambda m: job_counts(m, "first"), what="the first cluster")
    # the kubelet's update: a symlink swap
    volume.publish(config("first", "second"))
    proc.wait_for_metrics(lambda m: job_counts(m, "second"), what="the swap to be applied")
    assert "config file changed" in proc.logs()
    # a bad file is refused, logged, and the gauge drops; the running config stays
    volume.publish(config("first", "second", interval="often"))
    metrics = proc.wait_for_metrics(lambda m: m[RELOAD_OK] == 0, what="the refusal")
    assert job_counts(metrics, "first") and job_counts(metrics, "second")
    assert "configuration refused" in proc.logs() and "key 'interval'" in proc.logs()
    # an edit in place (no swap) is followed too, and a good file sets the gauge back
    volume.current.write_text(yaml.safe_dump(config("second")))
    proc.wait_for_metrics(
        lambda m: m[RELOAD_OK] == 1 and not samples(m, "zilliz_import_up",
                                                    cluster_name="first"),
        what="the edit to be applied")
    assert proc.logs().count("configuration reloaded") == 2

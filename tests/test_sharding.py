"""Which replica polls which cluster."""

from __future__ import annotations

import pytest

from exporter.config import ClusterConfig, Config
from exporter.sharding import parse_shard_index, select_shard, shard_of

PINNED_SHARDS = [0, 2, 0, 2, 1, 1, 1, 0]


def test_sharding_is_stable_and_parses_pod_names() -> None:
    assert parse_shard_index("3") == 3 and parse_shard_index("zie-2") == 2
    with pytest.raises(ValueError):
        parse_shard_index("zie")
    # The assignment is part of the deployment contract: a change would move clusters
    # between replicas on upgrade. These values are sha256-derived and pinned.
    assert [shard_of(f"c{i}", 3) for i in range(8)] == PINNED_SHARDS


def test_every_cluster_has_exactly_one_replica_and_adding_moves_nobody() -> None:
    clusters = tuple(ClusterConfig(name=f"c{i}", url="http://127.0.0.1:9", api="v2")
                     for i in range(12))
    config = Config(path="x", clusters=clusters)
    for count in (1, 2, 3, 5):
        owners = [sorted(c.name for c in select_shard(config, count, i))
                  for i in range(count)]
        flat = [name for names in owners for name in names]
        assert sorted(flat) == sorted(c.name for c in clusters)  # exactly once each
    more = Config(path="x", clusters=clusters + tuple(
        ClusterConfig(name=f"new{i}", url="http://127.0.0.1:9", api="v2") for i in range(9)))
    for i in range(3):
        before = {c.name for c in select_shard(config, 3, i)}
        after = {c.name for c in select_shard(more, 3, i) if not c.name.startswith("new")}
        assert before == after  # adding clusters moves nobody

"""Sharding: which replica polls which cluster.

The assignment is part of the deployment contract (a change would move clusters between
replicas on upgrade), so it depends on nothing but the cluster's name and the count.
"""

from __future__ import annotations

import hashlib
import re

from exporter.config import ClusterConfig, Config


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


def select_shard(config: Config, count: int, index: int) -> tuple[ClusterConfig, ...]:
    """The clusters this replica polls."""
    return tuple(c for c in config.clusters if shard_of(c.name, count) == index)

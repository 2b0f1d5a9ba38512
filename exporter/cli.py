"""Command line, wiring and signals: the only place that builds the whole exporter."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Callable

import yaml
from urllib3.exceptions import InsecureRequestWarning
from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter import __version__
from exporter.board import SnapshotBoard
from exporter.collector import ImportCollector
from exporter.config import (
    Config, ConfigError, load_config, parse_config, redacted, shared_rate_notes,
)
from exporter.discovery import Discovery, DiscoveryBoard, SourceSnapshot
from exporter.exposition import ExpositionCache, FamilyList
from exporter.kinds import parse_duration
from exporter.logs import LEVELS, setup_logging
from exporter.memory import MemoryReturner, limit_malloc_arenas
from exporter.poller import PollerGroup
from exporter.sharding import parse_shard_index
from exporter.store import HistoryStore, StateFileInUse
from exporter.web import WebApp, create_server
from exporter.webconfig import WebConfig, load_web_config

if TYPE_CHECKING:
    from exporter.simulator import Simulator

log = logging.getLogger("exporter")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SWITCH_INTERVAL_SECONDS = 0.001    # while serving: see _serve


def build_parser() -> argparse.ArgumentParser:
    """The flags; each help text states its one true default (argparse's own
    ArgumentDefaultsHelpFormatter printed "(default: None)" for the shard flags, whose
    default comes from the environment, and "(default: )" for empty strings).
    argparse exits 2 on a usage error, as the contract wants."""
    p = argparse.ArgumentParser(
        prog="zilliz-import-exporter",
        description="Prometheus exporter for Zilliz Cloud and Milvus bulk-import jobs.")
    p.add_argument("-c", "--config.file", dest="config_file", default="config.yaml",
                   help="cluster configuration (YAML) (default: %(default)s)")
    p.add_argument("--config.auto-reload-interval", dest="auto_reload_interval", default="0",
                   help="check the config file's content at this interval (30s, 1m) and "
                        "reload when it changed, as on SIGHUP (default: 0, off)")
    p.add_argument("--web.listen-address", dest="listen_address", default=":9636",
                   help="host:port to serve on (default: %(default)s)")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                   help="path of the metrics endpoint (default: %(default)s)")
    p.add_argument("--web.config.file", dest="web_config_file", default="",
                   help="exporter-toolkit web config: TLS and basic auth "
                        "(default: none, plain HTTP without auth)")
    p.add_argument("--web.enable-lifecycle", dest="lifecycle", action="store_true",
                   help="enable POST /-/reload (default: off)")
    p.add_argument("--log.level", dest="log_level", default="info", choices=list(LEVELS),
                   help="log level (default: %(default)s)")
    p.add_argument("--log.format", dest="log_format", default="logfmt",
                   choices=["logfmt", "json"], help="log line format (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="poll every cluster once, write the exposition and exit, 1 if any "
                        "cluster failed (default: off, serve)")
    p.add_argument("--output", default="-",
                   help="with --once: file to replace atomically (default: -, stdout)")
    p.add_argument("--check-config", dest="check_config", action="store_true",
                   help="validate the config, print it with secrets redacted, and exit "
                        "(default: off)")
    p.add_argument("--discover", action="store_true",
                   help="ask each discovery source once, print the clusters it lists and "
                        "which would be polled (or why not), and exit (default: off)")
    p.add_argument("--demo", action="store_true",
                   help="poll a built-in simulated API, no account needed (default: off)")
    p.add_argument("--shard.count", dest="shard_count", default=None,
                   help="number of replicas sharing the clusters (default: "
                        "$ZIE_SHARD_COUNT, else 1)")
    p.add_argument("--shard.index", dest="shard_index", default=None,
                   help="this replica's shard, or a pod name ending in its ordinal "
                        "(default: $ZIE_SHARD_INDEX, else 0)")
    p.add_argument("--version", action="version",
                   version=f"zilliz-import-exporter {__version__}")
    return p


def parse_listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--web.listen-address {value!r} must be host:port")
    return host.strip("[]"), int(port)


def parse_reload_interval(value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"--config.auto-reload-interval: {exc}") from None
    if seconds < 0:
        raise ValueError(f"--config.auto-reload-interval {value!r} must not be negative")
    return seconds


def resolve_shard(args: argparse.Namespace, environ: dict[str, str]) -> tuple[int, int]:
    """Flags win over ZIE_SHARD_COUNT / ZIE_SHARD_INDEX."""
    raw_count = args.shard_count if args.shard_count is not None else \
        environ.get("ZIE_SHARD_COUNT", "1")
    raw_index = args.shard_index if args.shard_index is not None else \
        environ.get("ZIE_SHARD_INDEX", "0")
    if not str(raw_count).isdigit() or int(raw_count) < 1:
        raise ValueError(f"--shard.count {raw_count!r} must be a whole number of at least 1")
    count = int(raw_count)
    index = parse_shard_index(str(raw_index))
    if index >= count:
        raise ValueError(f"--shard.index {index} must be below --shard.count {count}")
    return count, index


def demo_config(sim: Simulator) -> Config:
    """The --demo configuration: the simulator's demo clusters, and one discovery source
    whose key sees two more (one STOPPED, so not polled); short intervals so everything
    shows within a minute, and buckets for the demo's imports, which take seconds, not
    hours."""
    from exporter.demo import DEMO_CLUSTERS, DEMO_DISCOVERY_KEY
    raw = {"defaults": {"interval": "5s", "stuck_after": "30s", "stall_after": "10s",
                        "stale_after": "30s",
                        "duration_buckets": ["5s", "10s", "20s", "30s", "45s", "1m", "90s",
                                             "2m", "5m"]},
           "discovery": [sim.discovery_config("demo", DEMO_DISCOVERY_KEY,
                                              refresh_interval="30s")],
           "clusters": [sim.cluster_config(name) for name, *_ in DEMO_CLUSTERS]}
    return parse_config(raw, "<demo>", environ={})


def _log_rate_notes(config: Config) -> None:
    for note in shared_rate_notes(config):
        log.warning("clusters share a rate limit", extra={"fields": {"note": note}})


class ConfigWatcher:
    """Reloads when the config file's content changes. A mounted ConfigMap is updated by
    the kubelet swapping a symlink, and nobody sends SIGHUP; hashing the content (not the
    mtime) sees that swap and ignores a rewrite with the same text."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._digest = self._read()     # taken before the first load: no edit is missed

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return hashlib.sha256(fh.read()).digest()
        except OSError:
            return None     # mid-swap or removed: the running config stays

    def check(self, reload: Callable[[], str | None]) -> bool:
        """Reload once per new content (a refused file is not retried until it changes)."""
        digest = self._read()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        log.info("config file changed", extra={"fields": {"file": self.path}})
        reload()
        return True

    def run(self, reload: Callable[[], str | None], stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.check(reload)


class ConfigRuntime:
    """Holds the running configuration and applies it, at start and on reloads (SIGHUP
    or /-/reload), through ``discovery``, which adds what its sources find."""

    def __init__(self, config: Config, group: PollerGroup, shard: tuple[int, int],
                 loader: Callable[[], Config], discovery: Discovery | None = None) -> None:
        self.config = config
        self.group = group
        self.shard = shard
        self.discovery = discovery or Discovery(DiscoveryBoard(), group.apply, shard=shard,
                                                limits=group.limits)
        self._loader = loader
        self._lock = threading.Lock()
        self.reload_ok = True
        self.generation = 0     # counts reloads, applied or refused: a scrape cache key
        self._ready = False

    def start(self, threads: bool = True) -> None:
        """Apply the configuration; without ``threads`` nothing polls or refreshes on
        its own (``--once``, ``--discover``: ``discovery.refresh_all`` refreshes)."""
        self.discovery.configure(self.config, start=threads)
        log.info("polling", extra={"fields": {
            "clusters": len(self.group.pollers), "configured": len(self.config.clusters),
            "discovery_sources": len(self.config.discovery),
            "shard": f"{self.shard[1]}/{self.shard[0]}"}})

    def reload(self) -> str | None:
        """Apply the config file again; None when applied, else the refusal."""
        with self._lock:
            try:
                return self._reload()
            finally:    # after reload_ok is set: a scrape then renders it afresh
                self.generation += 1

    def _reload(self) -> str | None:
        try:
            config = self._loader()
        except ConfigError as exc:
            self.reload_ok = False
            for line in exc.lines:
                log.error("configuration refused; the running one stays",
                          extra={"fields": {"error": line}})
            return str(exc)
        if config.state_file != self.config.state_file:
            log.warning("state_file changes take effect at the next restart")
        _log_rate_notes(config)
        changes = self.discovery.configure(config)
        self.config = config
        self.reload_ok = True
        summary = {kind: ",".join(sorted(n for n, k in changes.items() if k == kind))
                   for kind in ("added", "removed", "changed")}
        log.info("configuration reloaded", extra={"fields": {
            k: v for k, v in summary.items() if v}})
        return None

    def is_ready(self) -> bool:
        """Ready once every discovery source has refreshed and every cluster (those it
        found included) finished its first poll; it then stays ready."""
        if not self._ready:
            self._ready = self.discovery.settled() and \
                all(p.snapshot_polled for p in self.group.pollers.values())
        return self._ready

    def cache_generation(self) -> int:
        """Changes with what the scrape cache's board does not show: reloads and
        discovery's snapshots."""
        return self.generation + self.discovery.board.version


def build_registry(board: SnapshotBoard, reload_ok: Callable[[], bool],
                   clock: Callable[[], float] = time.time,
                   discovery: DiscoveryBoard | None = None,
                   imports: ImportCollector | None = None) -> CollectorRegistry:
    """The process collectors and ``imports`` (made here when not given)."""
    registry = process_registry()
    registry.register(imports or ImportCollector(board, clock=clock, reload_ok=reload_ok,
                                                 discovery=discovery))
    return registry


def process_registry() -> CollectorRegistry:
    """process_*, python_* and the GC's series, as every Python exporter has them."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def discovery_table(snap: SourceSnapshot) -> str:
    """What one source lists, as ``--discover`` prints it: a heading line, then one
    aligned row per cluster with the name it is polled under, or why it is not."""
    source = snap.source
    polled = sum(1 for c in snap.clusters if c.polled)
    head = f"source {source.name} ({source.control_plane.host}): "
    if not snap.up:
        head += f"refresh failed ({snap.last_error_reason}): {snap.last_error}"
        return head
    rows = [("NAME", "CLUSTER NAME", "CLUSTER ID", "REGION", "PROJECT", "STATUS", "POLLED")]
    for cluster in snap.clusters:
        listed = cluster.listed
        rows.append((cluster.name, listed.name, listed.cluster_id, listed.region_id or "-",
                     listed.project_id or "-", listed.status or "-",
                     "yes" if cluster.polled else f"no: {cluster.why_not}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
             for row in rows]
    return head + f"{len(snap.clusters)} clusters listed, {polled} polled\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()
    setup_logging(args.log_level, args.log_format)
    # tls_insecure_skip_verify is the operator's own choice, shown by --check-config;
    # urllib3 would otherwise print a warning on stderr for the first such request.
    warnings.simplefilter("ignore", InsecureRequestWarning)
    try:
        shard = resolve_shard(args, dict(os.environ))
        host, port = parse_listen_address(args.listen_address)
        reload_interval = parse_reload_interval(args.auto_reload_interval)
    except ValueError as exc:
        print(f"zilliz-import-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE

    stoppers: list[Callable[[], None]] = []
    watcher: ConfigWatcher | None = None
    if args.demo:
        from exporter.demo import DemoDirector
        from exporter.simulator import Simulator
        sim = Simulator().start()
        director = DemoDirector(sim).start()
        stoppers += [director.stop, sim.stop]
        config = demo_config(sim)
        loader: Callable[[], Config] = lambda: config  # noqa: E731
        log.info("demo mode: polling the built-in simulator", extra={"fields": {
            "simulator": sim.base_url, "stuck_job": director.stuck_job}})
    else:
        def loader() -> Config:
            return load_config(args.config_file)
        if reload_interval:
            watcher = ConfigWatcher(args.config_file, reload_interval)
        try:
            config = loader()
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_USAGE
    if args.check_config:
        print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
        for note in shared_rate_notes(config):
            print(f"note: {note}", file=sys.stderr)
        return EXIT_OK
    if args.discover:
        return _discover(config, shard)
    _log_rate_notes(config)
    try:
        web_config = load_web_config(args.web_config_file) if args.web_config_file \
            else WebConfig()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE

    try:
        store = HistoryStore(config.state_file) if config.state_file else None
    except (StateFileInUse, OSError) as exc:
        log.error("cannot open the state file", extra={"fields": {"error": str(exc)}})
        return EXIT_FAILURE
    board = SnapshotBoard()
    group = PollerGroup(board, store=store, shard=shard[1])
    runtime = ConfigRuntime(config, group, shard, loader)
    imports = ImportCollector(board, reload_ok=lambda: runtime.reload_ok,
                              discovery=runtime.discovery.board)
    try:
        if args.once:
            return _run_once(runtime, build_registry(board, lambda: True, imports=imports),
                             board, args.output)
        return _serve(runtime, imports, board, web_config, args, host, port, watcher)
    finally:
        runtime.discovery.stop()
        group.stop()
        if store is not None:
            store.close()
        for stop in stoppers:
            stop()


def _discover(config: Config, shard: tuple[int, int]) -> int:
    """--discover: each source asked once, its clusters printed; 2 when one failed."""
    if not config.discovery:
        print(f"{config.path}: no discovery source to ask (the 'discovery' list is empty)",
              file=sys.stderr)
        return EXIT_USAGE
    group = PollerGroup(SnapshotBoard(), shard=shard[1])
    runtime = ConfigRuntime(config, group, shard, lambda: config)
    try:
        runtime.discovery.configure(config, start=False)
        runtime.discovery.refresh_all()
    finally:
        runtime.discovery.stop()
        group.stop()
    sources = runtime.discovery.board.snapshots()
    print("\n\n".join(discovery_table(snap) for snap in sources))
    failed = [snap.source.name for snap in sources if not snap.up]
    if failed:
        print(f"{config.path}: discovery failed for {', '.join(failed)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _run_once(runtime: ConfigRuntime, registry: CollectorRegistry, board: SnapshotBoard,
              output: str) -> int:
    runtime.start(threads=False)
    runtime.discovery.refresh_all()         # then the clusters it found are polled too
    snapshots = runtime.group.poll_all_once()
    # Rendered as /metrics is: a series that cannot be encoded is left out and counted.
    served = CollectorRegistry(auto_describe=False)
    served.register(FamilyList(ExpositionCache(registry, board).families(generate_latest)))
    if output == "-":
        sys.stdout.buffer.write(generate_latest(served))
        sys.stdout.flush()
    else:   # replaced in one step, as node_exporter's textfile collector needs
        write_to_textfile(output, served)
    failed = [s.cluster.name for s in snapshots if not s.up]
    if failed:
        log.error("some clusters failed", extra={"fields": {"clusters": ",".join(failed)}})
    failed_sources = [s.source.name for s in runtime.discovery.board.snapshots() if not s.up]
    if failed_sources:
        log.error("some discovery sources failed",
                  extra={"fields": {"sources": ",".join(failed_sources)}})
    return EXIT_FAILURE if failed or failed_sources else EXIT_OK


def _serve(runtime: ConfigRuntime, imports: ImportCollector, board: SnapshotBoard,
           web_config: WebConfig, args: argparse.Namespace, host: str, port: int,
           watcher: ConfigWatcher | None) -> int:
    # The import collector beside the registry, not in it: its series are encoded
    # piece by piece, each cluster's only when it published (exposition).
    app = WebApp(registry=process_registry(), imports=imports, board=board,
                 telemetry_path=args.telemetry_path,
                 discovery=runtime.discovery.board, web_config=web_config,
                 lifecycle=args.lifecycle, reload=runtime.reload, is_ready=runtime.is_ready,
                 generation=runtime.cache_generation)
    # A scrape takes the GIL a few times (read, respond, write); while a poll parses
    # or folds a large listing, each take waited up to the default 5 ms switch
    # interval: scrape p99 during a 100,000-job poll was 16-21 ms, and 6.3-7.0 ms
    # with 1 ms (tests/bench, scrape). It costs at most a thread switch per
    # millisecond, and only while threads contend for the GIL.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    try:
        server = create_server(app, host, port)
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"address": args.listen_address,
                                                     "error": exc.strerror or str(exc)}})
        return EXIT_FAILURE
    stop = threading.Event()

    def on_stop(signum: int, frame: object) -> None:
        stop.set()

    def on_hup(signum: int, frame: object) -> None:
        threading.Thread(target=runtime.reload, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    runtime.start()
    if watcher is not None:
        threading.Thread(target=watcher.run, args=(runtime.reload, stop),
                         name="config-watcher", daemon=True).start()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="http", daemon=True)
    thread.start()
    bound = str(server.server_address[0])
    shown = bound if bound not in ("", "0.0.0.0", "::") else "0.0.0.0"
    log.info("listening", extra={"fields": {
        "address": f"{shown}:{server.server_port}", "tls": web_config.tls is not None,
        "version": __version__}})
    memory = MemoryReturner()
    while not stop.wait(1.0):
        memory.tick()
    log.info("shutting down")
    server.shutdown()
    server.server_close()
    return EXIT_OK


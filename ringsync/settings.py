"""Settings from RINGRIFT_* variables, a .env file and the cluster inventory."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import socket
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar

from dotenv import dotenv_values

from ringsync.errors import BadInputError, ConfigError
from ringsync.inventory import (
    DEFAULT_P2P_PORT,
    TRANSPORT_NAMES,
    Host,
    Inventory,
    load_inventory,
    parse_transport_order,
)
from ringsync.policy.bandwidth import BandwidthLimits
from ringsync.policy.chains import TransportChains, parse_chains
from ringsync.policy.sources import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SourcePatterns, parse_patterns
from ringsync.protocol.batch import validate_source_node

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("/var/lib/ringsync")
MIN_TOKEN_LENGTH = 16
MIB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_MAX_HOSTS_SHOWN = 10
_TOKEN_HINT = "e.g. `openssl rand -hex 32`"
_T = TypeVar("_T", int, float)


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One RINGRIFT_* variable: the single source for parsing, docs and .env.example."""

    name: str
    default: str  # literal default as written in .env.example; "" when computed or unset
    meaning: str
    default_text: str = ""  # how the default reads in docs when it is not a literal
    secret: bool = False

    @property
    def documented_default(self) -> str:
        return self.default_text or self.default


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("RINGRIFT_ENV_FILE", "", "A .env file to read (it must exist); set it in the real "
           "environment, which wins over the file", default_text="./.env when present"),
    EnvVar("RINGRIFT_NODE_ID", "", "This node's name; with an inventory it must be one of its "
           "hosts", default_text="the hostname"),
    EnvVar("RINGRIFT_DATA_DIR", str(DEFAULT_DATA_DIR), "Where this node keeps games, models and "
           "ringsync's state; relative paths resolve against the working directory"),
    EnvVar("RINGRIFT_CLUSTER_CONFIG", "", "The cluster inventory (RingRift's "
           "distributed_hosts.yaml)", default_text="none (a single-node cluster)"),
    EnvVar("RINGRIFT_P2P_HOST", "", "Address the data server binds; without a cluster token it "
           "must be loopback", default_text="this node's p2p_host in the inventory, else 0.0.0.0 "
           "with a token and 127.0.0.1 without"),
    EnvVar("RINGRIFT_P2P_PORT", str(DEFAULT_P2P_PORT), "Port of the data server (1-65535)",
           default_text=f"this node's p2p_port in the inventory, else {DEFAULT_P2P_PORT}"),
    EnvVar("RINGRIFT_CLUSTER_AUTH_TOKEN", "", "Shared secret every peer request must carry, the "
           f"same on every node, at least {MIN_TOKEN_LENGTH} characters ({_TOKEN_HINT})",
           default_text="none (peer endpoints are refused)", secret=True),
    EnvVar("RINGRIFT_CLUSTER_AUTH_TOKEN_FILE", "", "A file holding the cluster token (surrounding "
           "whitespace is ignored); set this or RINGRIFT_CLUSTER_AUTH_TOKEN, not both",
           default_text="none"),
    EnvVar("RINGRIFT_SYNC_INTERVAL", "60", "Seconds between periodic syncs (> 0); commits also "
           "wake the sync at once", default_text="auto_sync.interval_seconds in the inventory, "
           "else 60"),
    EnvVar("RINGRIFT_COORDINATOR_NODE", "", "Name of the coordinator host, which never receives "
           "games", default_text="hosts whose role contains 'coordinator'"),
    EnvVar("RINGRIFT_SKIP_NFS_SYNC", "true", "Skip sending games to a peer that uses the same data "
           "dir on shared storage (equal .ringsync/data_dir_id), counted per peer; other peers are "
           "always sent to (true/false)", default_text="auto_sync.skip_nfs_sync in the inventory, "
           "else true"),
    EnvVar("RINGRIFT_SYNC_BATCH_GAMES", "500", "Most games in one pushed batch (1-100000)"),
    EnvVar("RINGRIFT_MAX_BATCH_BYTES", str(64 * MIB), "Largest batch in bytes this node sends or "
           "accepts (at least 1048576)"),
    EnvVar("RINGRIFT_DRAIN_TIMEOUT", "10", "Seconds in-flight work may take to finish on SIGTERM "
           "(> 0)"),
    EnvVar("RINGRIFT_SYNC_DEBOUNCE", "0.02", "Seconds to wait after a commit so that bursts "
           "become one batch (>= 0)"),
    EnvVar("RINGRIFT_PUSH_TIMEOUT", "120", "Seconds one push to a peer may take (> 0)"),
    EnvVar("RINGRIFT_DAEMON_RESTART_LIMIT", "5", "Restarts a crashing daemon gets within the "
           "window before the process exits for systemd (>= 0)"),
    EnvVar("RINGRIFT_DAEMON_RESTART_WINDOW", "300", "Seconds over which daemon restarts are "
           "counted (> 0)"),
    EnvVar("RINGRIFT_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    EnvVar("RINGRIFT_USE_UVLOOP", "true", "Run the event loop on uvloop (true/false)"),
    EnvVar("RINGRIFT_GAME_SOURCES", ",".join(DEFAULT_INCLUDE), "Where local generators write "
           "games: comma-separated gitignore-style globs relative to RINGRIFT_DATA_DIR (.db "
           "files are read as game DBs, .jsonl and .jsonl.gz as JSONL game logs); no absolute "
           "paths or '..'", default_text=", ".join(DEFAULT_INCLUDE)),
    EnvVar("RINGRIFT_GAME_SOURCES_EXCLUDE", "", "More globs (as RINGRIFT_GAME_SOURCES) never "
           "read as sources, added to the built-in exclusions of received, fetched, imported, "
           "consolidated and evaluation games (" + ", ".join(DEFAULT_EXCLUDE) + ")",
           default_text="none beyond the built-in ones"),
    EnvVar("RINGRIFT_ACTIVE_GAME_TIMEOUT", "21600", "Seconds a game may stay unfinished in a "
           "local selfplay DB before it is no longer re-checked (a killed writer's placeholder; "
           "> 0); a game finishing later is not shipped"),
    EnvVar("RINGRIFT_HTTP_HEADER_TIMEOUT", "10", "Seconds a new connection to the data server "
           "may take to send its first complete request header; then it is closed and counted "
           "(> 0)"),
    EnvVar("RINGRIFT_HTTP_IDLE_TIMEOUT", "75", "Seconds an idle keep-alive connection to the "
           "data server stays open, also one that sends part of its next request (> 0)"),
    EnvVar("RINGRIFT_HTTP_BODY_TIMEOUT", "30", "Seconds an upload to the data server may go "
           "without sending a byte; then it is dropped and counted (> 0)"),
    EnvVar("RINGRIFT_HTTP_MAX_CONNECTIONS", "1024", "Most connections the data server holds at "
           "once; more are closed at once and counted (>= 1; lowered to fit the open-file "
           "limit)"),
    EnvVar("RINGRIFT_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "64", "Most connections from one "
           "address, loopback included, so one flooding address cannot lock out peers and "
           "/healthz (1..RINGRIFT_HTTP_MAX_CONNECTIONS)"),
    EnvVar("RINGRIFT_MAX_UPLOAD_BYTES_IN_FLIGHT", "", "Bytes of uploaded batches the data "
           "server holds at once, being received or waiting to merge (at least "
           "RINGRIFT_MAX_BATCH_BYTES); an upload beyond it is answered 503 with Retry-After",
           default_text="4 times RINGRIFT_MAX_BATCH_BYTES"),
    EnvVar("RINGRIFT_MAX_MERGES_IN_FLIGHT", "2", "Received batches decoded and merged at once; "
           "further uploads wait their turn (1-64)"),
    EnvVar("RINGRIFT_MAX_CONFIGS", "256", "Most config DBs (board type and player count, e.g. "
           "hex8_2p) this node merges received games into; a batch for one more is refused "
           "(1-100000)"),
    EnvVar("RINGRIFT_MERGED_SHARD_MB", "512", "A received config's merged DB takes new games "
           "until it holds this many MiB; then <config>+2.db beside it does, and so on (RingRift's "
           "discovery reads them all). Small DBs keep merges cheap: RingRift's random game_id "
           "index pages make a merge into a 35 GB DB write 16 times the payload. 0: one DB, "
           "never bounded"),
    EnvVar("RINGRIFT_BANDWIDTH_LIMIT_MBPS", "", "Mbit/s all of this node's sends may use "
           "together (>= 0; 0: no limit); replaces the inventory's total. Limits per peer come "
           "from the inventory: the most specific auto_sync.host_bandwidth_overrides glob, else "
           "the peer's bandwidth_mbps", default_text="auto_sync.bandwidth_limit_mbps in the "
           "inventory, capped by this host's bandwidth_mbps; else no limit"),
    EnvVar("RINGRIFT_MAX_TRANSFERS", "32", "Most transfers this node sends at once (>= 1); "
           "low-priority ones leave two free and games one, for higher priorities"),
    EnvVar("RINGRIFT_MAX_TRANSFERS_PER_PEER", "4", "Most transfers this node sends to one peer "
           "at once (1..RINGRIFT_MAX_TRANSFERS)"),
    EnvVar("RINGRIFT_SCAN_CHUNK_ROWS", "10000", "New games rows a sync cycle reads per local "
           "selfplay DB (>= 1): a large backlog ships its first games while the rest is still "
           "being read"),
    EnvVar("RINGRIFT_TRANSPORT_ORDER", "http", "How peers are reached, in the order tried when "
           "one cannot reach the peer: comma-separated " + ", ".join(TRANSPORT_NAMES) + " (ssh: the "
           "same peer API through an SSH connection to the peer's ssh_host, to its data server on "
           "127.0.0.1); a host's transport field in the inventory wins"),
    EnvVar("RINGRIFT_TRANSPORT_CHAINS", "", "Fallback chains per data type, tried in order: "
           "key=t1,t2 parts separated by ';', key one of games, models, training_data, "
           "large_files (files of RINGRIFT_LARGE_FILE_MB or more); games take http, ssh; files "
           "also aria2, rsync (a step this build lacks is skipped and counted as unavailable). "
           "Each step's outcome is in ringsync_transport_attempts_total. games= replaces "
           "RINGRIFT_TRANSPORT_ORDER (set one of them)",
           default_text="games=RINGRIFT_TRANSPORT_ORDER;models=http;training_data=http;"
           "large_files=aria2,http,rsync"),
    EnvVar("RINGRIFT_LARGE_FILE_MB", "64", "MiB from which a model or training file takes the "
           "large_files chain of RINGRIFT_TRANSPORT_CHAINS: by default aria2c from every peer "
           "holding it at once (when two or more do and aria2c is installed), then http (>= 1)"),
    EnvVar("RINGRIFT_SSH_KNOWN_HOSTS", "~/.ssh/known_hosts", "The known_hosts file SSH peers' host "
           "keys are checked against; a peer whose key is missing or different is refused"),
    EnvVar("RINGRIFT_SSH_MAX_CHANNELS", "10", "Most channels (concurrent requests) on the one SSH "
           "connection to a peer; keep it at or below the peer sshd's MaxSessions (1-1000)"),
    EnvVar("RINGRIFT_SSH_KEEPALIVE_INTERVAL", "3", "Seconds of silence from an SSH peer before a "
           "keepalive is sent (> 0)"),
    EnvVar("RINGRIFT_SSH_KEEPALIVE_COUNT_MAX", "3", "Unanswered keepalives after which an SSH "
           "peer counts as dead and its connection is closed (>= 1)"),
    EnvVar("RINGRIFT_SSH_CONNECT_TIMEOUT", "10", "Seconds an SSH connection and login to a peer "
           "may take (> 0)"),
    EnvVar("RINGRIFT_CIRCUIT_FAILURE_THRESHOLD", "5", "Transient failures in a row (peer "
           "unreachable, timed out, busy) that open a peer's circuit breaker for one transport "
           "(http, ssh, rsync, aria2): it is skipped for that peer (its games wait once every "
           "game transport is open) and probed later (1-1000)"),
    EnvVar("RINGRIFT_CIRCUIT_RECOVERY", "5", "Seconds an open circuit breaker leaves its peer "
           "alone before one probe (> 0); doubles with each failed probe, with 20% jitter"),
    EnvVar("RINGRIFT_CIRCUIT_RECOVERY_MAX", "300", "Most seconds an open circuit breaker waits "
           "before a probe (>= RINGRIFT_CIRCUIT_RECOVERY)"),
    EnvVar("RINGRIFT_MODELS_DIR", "", "Where this node keeps models (.pth, .pt, .onnx), shipped "
           "to every selfplay and training node under the same relative path (RingRift keeps "
           "them in ai-service/models, beside data/)", default_text="RINGRIFT_DATA_DIR/models"),
    EnvVar("RINGRIFT_TRAINING_DIR", "", "Where this node keeps training data (.npz), shipped to "
           "training nodes only, never the coordinator", default_text="RINGRIFT_DATA_DIR/training"),
    EnvVar("RINGRIFT_FILE_SETTLE_TIME", "5", "Seconds a model or training file must stay "
           "unchanged (size, mtime, inode) before it is hashed and offered to peers (> 0)"),
    EnvVar("RINGRIFT_FILE_POLL_INTERVAL", "10", "Seconds between polls of the peers' file "
           "indexes for models and training data this node lacks (> 0)"),
    EnvVar("RINGRIFT_FILE_ABANDON_AFTER", "3600", "Seconds a download in flight may go without "
           "any peer offering its content before it is abandoned (its journal row, part file "
           "and aria2 control file removed); a peer whose index cannot be read counts as "
           "still offering what it last offered (> 0)"),
    EnvVar("RINGRIFT_FILE_UPLOAD_SLOTS", "1", "Peers this node streams one model or training "
           "file to at once (>= 1); the others fetch it from nodes still downloading it, which "
           "relay what they hold, so a new file spreads as a pipeline (1: each uplink carries "
           "one full-rate stream; more: a tree, each stream slower)"),
    EnvVar("RINGRIFT_RSYNC_MIN_FILES", "50", "Files owed by one SSH-reachable peer (transport "
           "field or RINGRIFT_TRANSPORT_ORDER lists ssh) from which they are fetched in one rsync "
           "run over SSH instead of one request each; the peer's directories are its inventory "
           "models_dir / training_dir, else the same paths as here (0: never use rsync)"),
)
ENV_VAR_NAMES = frozenset(v.name for v in ENV_VARS)
_SECRET_NAMES = frozenset(v.name for v in ENV_VARS if v.secret)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node needs to know, built once at start-up and passed down."""

    node_id: str
    data_dir: Path
    inventory: Inventory = field(default_factory=Inventory)
    p2p_host: str = "127.0.0.1"
    p2p_port: int = 8770
    auth_token: str | None = field(default=None, repr=False)
    sync_interval: float = 60.0
    coordinator_node: str | None = None
    skip_nfs_sync: bool = True
    batch_games: int = 500
    max_batch_bytes: int = 64 * 1024 * 1024
    drain_timeout: float = 10.0
    debounce: float = 0.02
    push_timeout: float = 120.0
    restart_limit: int = 5
    restart_window: float = 300.0
    log_level: str = "INFO"
    use_uvloop: bool = True
    game_sources: tuple[str, ...] = DEFAULT_INCLUDE
    game_sources_exclude: tuple[str, ...] = ()
    active_game_timeout: float = 21600.0
    http_header_timeout: float = 10.0
    http_idle_timeout: float = 75.0
    http_body_timeout: float = 30.0
    http_max_connections: int = 1024
    http_max_connections_per_address: int = 64
    max_upload_bytes_in_flight: int | None = None  # None: 4 times max_batch_bytes
    max_merges_in_flight: int = 2
    max_configs: int = 256
    merged_shard_mb: int = 512
    scan_chunk_rows: int = 10_000
    transport_order: tuple[str, ...] = ("http",)
    transport_chains: TransportChains = field(default_factory=TransportChains)
    ssh_known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    ssh_max_channels: int = 10
    ssh_keepalive_interval: float = 3.0
    ssh_keepalive_count_max: int = 3
    ssh_connect_timeout: float = 10.0
    circuit_failure_threshold: int = 5
    circuit_recovery: float = 5.0
    circuit_recovery_max: float = 300.0
    bandwidth_limit_mbps: float | None = None  # all sends together; None: no limit
    max_transfers: int = 32
    max_transfers_per_peer: int = 4
    models_dir_setting: Path | None = None  # None: <data_dir>/models
    training_dir_setting: Path | None = None  # None: <data_dir>/training
    file_settle_time: float = 5.0
    file_poll_interval: float = 10.0
    file_abandon_after: float = 3600.0
    file_upload_slots: int = 1
    rsync_min_files: int = 50

    @property
    def state_root(self) -> Path:
        """ringsync's directory in the data dir: the data dir's id and one state dir per node."""
        return self.data_dir / ".ringsync"

    @property
    def state_dir(self) -> Path:
        """This node's own durable state, outside games/: never shared with another node,
        even when several nodes use one data dir on shared storage."""
        return self.state_root / self.node_id

    @property
    def models_dir(self) -> Path:
        return self.models_dir_setting or self.data_dir / "models"

    @property
    def training_dir(self) -> Path:
        return self.training_dir_setting or self.data_dir / "training"

    @property
    def games_dir(self) -> Path:
        return self.data_dir / "games"

    @property
    def received_root(self) -> Path:
        """Received games of every node using this data dir; never a source."""
        return self.games_dir / "synced"

    @property
    def synced_dir(self) -> Path:
        """Where this node merges received games (games/synced/<node>/, RingRift's layout):
        nodes sharing a data dir never write one SQLite file from two hosts."""
        return self.received_root / self.node_id

    @property
    def upload_budget_bytes(self) -> int:
        """Bytes of uploaded batches the data server holds at once."""
        if self.max_upload_bytes_in_flight is None:
            return 4 * self.max_batch_bytes
        return max(self.max_upload_bytes_in_flight, self.max_batch_bytes)

    @property
    def source_patterns(self) -> SourcePatterns:
        """Which files under the data dir are this node's own games (class b never is)."""
        return SourcePatterns(self.game_sources, DEFAULT_EXCLUDE + self.game_sources_exclude)

    @property
    def bandwidth_limits(self) -> BandwidthLimits:
        """Rates and transfer counts the bandwidth limiter enforces; per peer from the inventory."""
        return BandwidthLimits(
            total_mbps=self.bandwidth_limit_mbps, peer_mbps=self.inventory.peer_bandwidth_mbps,
            max_transfers=self.max_transfers,
            max_transfers_per_peer=min(self.max_transfers_per_peer, self.max_transfers))

    @property
    def replication_target(self) -> int:
        """K: how many nodes besides the generator hold each game."""
        return self.inventory.sync_routing.replication_target

    def describe(self) -> dict[str, object]:
        """Plain, JSON-ready values safe to log or show in status (the token only as set/unset)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "auth_token":
                value = "set" if value else "unset"
            elif isinstance(value, Inventory):
                value = str(value.source) if value.source else None
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, TransportChains):
                value = value.describe()
            out[f.name] = value
        out["hosts"] = len(self.inventory.hosts)
        out["replication_target"] = self.replication_target
        return out


def load_settings(environ: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> Settings:
    """Build Settings from the environment (default os.environ), a .env file and the inventory."""
    cwd = (cwd or Path.cwd()).resolve()
    env = _Env(_merge_env_file(os.environ if environ is None else environ, cwd))
    configured = _load_configured_inventory(env, cwd)
    node_id = _sendable_node_id(_node_id(env, configured))
    inventory = configured or Inventory.single_node(node_id)
    token = _auth_token(env, cwd)
    p2p_host = _p2p_host(env, inventory, node_id, token)
    return Settings(
        node_id=node_id,
        data_dir=_data_dir(env, cwd),
        inventory=inventory,
        p2p_host=p2p_host,
        p2p_port=_p2p_port(env, inventory.get(node_id)),
        auth_token=token,
        sync_interval=env.number("RINGRIFT_SYNC_INTERVAL", _default_interval(inventory)),
        coordinator_node=_coordinator(env, configured),
        skip_nfs_sync=env.flag("RINGRIFT_SKIP_NFS_SYNC", _default_skip_nfs(inventory)),
        batch_games=env.integer("RINGRIFT_SYNC_BATCH_GAMES", 500, minimum=1, maximum=100_000),
        max_batch_bytes=env.integer("RINGRIFT_MAX_BATCH_BYTES", 64 * MIB, minimum=MIB),
        drain_timeout=env.number("RINGRIFT_DRAIN_TIMEOUT", 10.0),
        debounce=env.number("RINGRIFT_SYNC_DEBOUNCE", 0.02, allow_zero=True),
        push_timeout=env.number("RINGRIFT_PUSH_TIMEOUT", 120.0),
        restart_limit=env.integer("RINGRIFT_DAEMON_RESTART_LIMIT", 5, minimum=0),
        restart_window=env.number("RINGRIFT_DAEMON_RESTART_WINDOW", 300.0),
        log_level=env.choice("RINGRIFT_LOG_LEVEL", "INFO", LOG_LEVELS),
        use_uvloop=env.flag("RINGRIFT_USE_UVLOOP", True),
        game_sources=parse_patterns("RINGRIFT_GAME_SOURCES", env.get("RINGRIFT_GAME_SOURCES"),
                                    DEFAULT_INCLUDE),
        game_sources_exclude=parse_patterns("RINGRIFT_GAME_SOURCES_EXCLUDE",
                                            env.get("RINGRIFT_GAME_SOURCES_EXCLUDE"), ()),
        active_game_timeout=env.number("RINGRIFT_ACTIVE_GAME_TIMEOUT", 21600.0),
        **_http_limits(env),
        max_configs=env.integer("RINGRIFT_MAX_CONFIGS", 256, minimum=1, maximum=100_000),
        merged_shard_mb=env.integer("RINGRIFT_MERGED_SHARD_MB", 512, minimum=0),
        scan_chunk_rows=env.integer("RINGRIFT_SCAN_CHUNK_ROWS", 10_000, minimum=1),
        **_ssh_settings(env, cwd),
        **_circuit_settings(env),
        **_bandwidth(env, inventory, node_id),
        models_dir_setting=_optional_dir(env, "RINGRIFT_MODELS_DIR", cwd),
        training_dir_setting=_optional_dir(env, "RINGRIFT_TRAINING_DIR", cwd),
        file_settle_time=env.number("RINGRIFT_FILE_SETTLE_TIME", 5.0),
        file_poll_interval=env.number("RINGRIFT_FILE_POLL_INTERVAL", 10.0),
        file_abandon_after=env.number("RINGRIFT_FILE_ABANDON_AFTER", 3600.0),
        file_upload_slots=env.integer("RINGRIFT_FILE_UPLOAD_SLOTS", 1, minimum=1),
        rsync_min_files=env.integer("RINGRIFT_RSYNC_MIN_FILES", 50, minimum=0),
    )


def load_client_settings(
    environ: Mapping[str, str] | None = None, *, cwd: Path | None = None,
    token_file: str | None = None,
) -> Settings:
    """Settings for a client of the cluster (`ringsync status`) on any machine.

    Only the inventory and the token matter: the machine need not be a host of the
    inventory, and no data dir is used. ``token_file`` (--token-file) beats the env.
    """
    cwd = (cwd or Path.cwd()).resolve()
    env = _Env(_merge_env_file(os.environ if environ is None else environ, cwd))
    configured = _load_configured_inventory(env, cwd)
    node_id = env.get("RINGRIFT_NODE_ID") or socket.gethostname()
    inventory = configured or Inventory.single_node(node_id)
    if token_file:
        token: str | None = _check_token(_read_token_file(token_file, cwd, "--token-file"),
                                         f"the token in {token_file}")
    else:
        token = _auth_token(env, cwd)
    host = inventory.get(node_id)
    return Settings(
        node_id=node_id, data_dir=cwd, inventory=inventory, auth_token=token,
        p2p_host=env.get("RINGRIFT_P2P_HOST") or (host.address if host else "127.0.0.1"),
        p2p_port=_p2p_port(env, host),
    )


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: addresses only this machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def env_example() -> str:
    """The text of .env.example, rendered from ENV_VARS.

    Regenerate with: python -c "from ringsync.settings import env_example as e; print(e(), end='')"
    """
    parts = [
        "# ringsync settings. Copy to .env (or point RINGRIFT_ENV_FILE at a copy) and edit.\n"
        "# The real environment wins over this file; an empty value counts as unset.\n"
    ]
    for var in ENV_VARS:
        comment = f"{var.meaning}. Default: {var.documented_default}"
        lines = textwrap.wrap(comment, width=98)
        assignment = f"#{var.name}={var.default}" if var.default else f"{var.name}="
        parts.append("".join(f"# {line}\n" for line in lines) + assignment + "\n")
    return "\n".join(parts)


class _Env:
    """RINGRIFT_* values (a .env file under the real environment) with typed, checked reads."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def get(self, name: str) -> str | None:
        if name not in ENV_VAR_NAMES:
            raise KeyError(f"{name} is read but not declared in ENV_VARS")
        return self._values.get(name, "").strip() or None

    def fail(self, name: str, allowed: str) -> ConfigError:
        shown = "(hidden)" if name in _SECRET_NAMES else repr(self.get(name))
        return ConfigError(f"{name} = {shown} {allowed}")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        bound = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
        value = self._parsed(name, _parse_int)
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            raise self.fail(name, f"is out of range; use an integer {bound}")
        return value

    def optional_integer(self, name: str, *, minimum: int) -> int | None:
        return None if self.get(name) is None else self.integer(name, 0, minimum=minimum)

    def number(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._parsed(name, _parse_float)
        if value is None:
            return default
        if value < 0 or (value == 0 and not allow_zero):
            raise self.fail(name, f"is out of range; use a number {'>=' if allow_zero else '>'} 0")
        return value

    def flag(self, name: str, default: bool) -> bool:
        text = self.get(name)
        if text is None:
            return default
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise self.fail(name, "is not a boolean; use true/false, 1/0, yes/no or on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.get(name)
        if text is None:
            return default
        if text.upper() not in choices:
            raise self.fail(name, f"is not allowed; use one of {', '.join(choices)}")
        return text.upper()

    def _parsed(self, name: str, parse: Callable[[str], _T | None]) -> _T | None:
        text = self.get(name)
        if text is None:
            return None
        value = parse(text)
        if value is None:
            kind = "an integer" if parse is _parse_int else "a number"
            raise self.fail(name, f"is not {kind}")
        return value


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _resolve(raw: str, cwd: Path, name: str) -> Path:
    """An absolute path: ~ expanded, a relative path taken from cwd."""
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # ~user that does not exist, or no HOME
        raise ConfigError(f"{name} = {raw!r} cannot be expanded ({exc}); "
                          "use an absolute path") from exc
    return path if path.is_absolute() else (cwd / path).resolve()


def _merge_env_file(environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """The .env file's values, overridden by every non-empty real environment value."""
    merged = {k: v for k, v in _read_env_file(environ, cwd).items() if v is not None}
    merged.update({k: v for k, v in environ.items() if v.strip()})
    _refuse_replaced(merged)
    _warn_on_typos(merged)
    return merged


def _read_env_file(environ: Mapping[str, str], cwd: Path) -> dict[str, str | None]:
    named = environ.get("RINGRIFT_ENV_FILE", "").strip()
    if named:
        path = _resolve(named, cwd, "RINGRIFT_ENV_FILE")
        if not path.exists() or path.is_dir():
            problem = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"RINGRIFT_ENV_FILE = {named!r} {problem}; "
                              "point it at an existing .env file or unset it")
    else:
        path = cwd / ".env"
        if not path.is_file():
            return {}
    try:
        return dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"env file {path}: cannot read it ({exc})") from exc


# Variables that once existed and are no longer read: set, they stop the start with the fix.
# Keyed without the prefix: they are deliberately absent from ENV_VARS and .env.example.
_REPLACED = {
    "FILE_SERVE_MBPS": "file serving is now paced by the node's one bandwidth limiter, "
    "with games and pushes: set RINGRIFT_BANDWIDTH_LIMIT_MBPS (or auto_sync.bandwidth_limit_mbps, "
    "bandwidth_mbps, auto_sync.host_bandwidth_overrides in the inventory) and remove it",
}


def _refuse_replaced(values: Mapping[str, str]) -> None:
    for suffix, fix in _REPLACED.items():
        name = "RINGRIFT_" + suffix
        if values.get(name, "").strip():
            raise ConfigError(f"{name} is no longer read: {fix}")


def _warn_on_typos(values: Mapping[str, str]) -> None:
    """Log a RINGRIFT_* name that is close to, but not, one of ours (RingRift has its own)."""
    for name in values:
        if name.startswith("RINGRIFT_") and name not in ENV_VAR_NAMES:
            close = difflib.get_close_matches(name, ENV_VAR_NAMES, n=1, cutoff=0.85)
            if close:
                log.warning("ignoring unknown variable %s; did you mean %s?", name, close[0])


def _load_configured_inventory(env: _Env, cwd: Path) -> Inventory | None:
    raw = env.get("RINGRIFT_CLUSTER_CONFIG")
    if raw is None:
        return None
    path = _resolve(raw, cwd, "RINGRIFT_CLUSTER_CONFIG")
    if not path.exists():
        raise env.fail("RINGRIFT_CLUSTER_CONFIG",
                       "does not exist; point it at the cluster's distributed_hosts.yaml")
    return load_inventory(path)


def _host_list(inventory: Inventory) -> str:
    names = inventory.host_names
    shown = ", ".join(names[:_MAX_HOSTS_SHOWN])
    more = len(names) - _MAX_HOSTS_SHOWN
    return f"{shown}, … ({more} more)" if more > 0 else shown


def _node_id(env: _Env, inventory: Inventory | None) -> str:
    explicit = env.get("RINGRIFT_NODE_ID")
    hostname = socket.gethostname()
    if inventory is None:
        return explicit or hostname
    candidates = [explicit] if explicit else [hostname, hostname.split(".")[0]]
    found = next((name for name in candidates if name in inventory), None)
    if found is not None:
        return found
    where = f"is not a host in inventory {inventory.source}; use one of: {_host_list(inventory)}"
    if explicit:
        raise env.fail("RINGRIFT_NODE_ID", where)
    raise ConfigError(f"RINGRIFT_NODE_ID is unset and this machine's hostname {hostname!r} {where}")


def _data_dir(env: _Env, cwd: Path) -> Path:
    raw = env.get("RINGRIFT_DATA_DIR")
    path = DEFAULT_DATA_DIR if raw is None else _resolve(raw, cwd, "RINGRIFT_DATA_DIR")
    if path.exists() and not path.is_dir():
        raise env.fail("RINGRIFT_DATA_DIR", f"is not a directory ({path} exists as a file); "
                       "point it at a directory")
    return path


def _optional_dir(env: _Env, name: str, cwd: Path) -> Path | None:
    raw = env.get(name)
    if raw is None:
        return None
    path = _resolve(raw, cwd, name)
    if path.exists() and not path.is_dir():
        raise env.fail(name, f"is not a directory ({path} exists as a file); point it at a directory")
    return path


def _auth_token(env: _Env, cwd: Path) -> str | None:
    direct = env.get("RINGRIFT_CLUSTER_AUTH_TOKEN")
    file = env.get("RINGRIFT_CLUSTER_AUTH_TOKEN_FILE")
    if direct and file:
        raise ConfigError("RINGRIFT_CLUSTER_AUTH_TOKEN and RINGRIFT_CLUSTER_AUTH_TOKEN_FILE are "
                          "both set; set only one of them")
    if file:
        return _check_token(_read_token_file(file, cwd), f"the token in {file}")
    return _check_token(direct, "RINGRIFT_CLUSTER_AUTH_TOKEN") if direct else None


def _read_token_file(raw: str, cwd: Path,
                     name: str = "RINGRIFT_CLUSTER_AUTH_TOKEN_FILE") -> str:
    path = _resolve(raw, cwd, name)
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{name} = {raw!r} cannot be read "
                          f"({reason}); point it at a readable file holding the token") from None


def _check_token(token: str, what: str) -> str:
    """The token itself never appears in a message: only its length."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{what} is too short ({len(token)} characters); use at least "
                          f"{MIN_TOKEN_LENGTH}, {_TOKEN_HINT}")
    if not token.isprintable():
        raise ConfigError(f"{what} contains control characters; use printable characters, "
                          f"{_TOKEN_HINT}")
    return token


def _p2p_host(env: _Env, inventory: Inventory, node_id: str, token: str | None) -> str:
    """RINGRIFT_P2P_HOST, else the node's p2p_host, else a default that is safe without a token."""
    host = inventory.get(node_id)
    explicit = env.get("RINGRIFT_P2P_HOST")
    if explicit:
        value, origin = explicit, "RINGRIFT_P2P_HOST"
    elif host is not None and host.p2p_host:
        value, origin = host.p2p_host, f"inventory {inventory.source}: hosts.{node_id}.p2p_host"
    else:
        return "0.0.0.0" if token else "127.0.0.1"
    if token is None and not is_loopback_host(value):
        raise ConfigError(
            f"{origin} = {value!r} is not a loopback address, but no cluster token is configured: "
            "peer endpoints need the cluster token. Set RINGRIFT_CLUSTER_AUTH_TOKEN (or "
            "RINGRIFT_CLUSTER_AUTH_TOKEN_FILE) to the same secret on every node, "
            f"{_TOKEN_HINT}, or bind RINGRIFT_P2P_HOST=127.0.0.1"
        )
    return value


def _p2p_port(env: _Env, host: Host | None) -> int:
    default = host.p2p_port if host is not None else DEFAULT_P2P_PORT
    return env.integer("RINGRIFT_P2P_PORT", default, minimum=1, maximum=65535)


def _default_skip_nfs(inventory: Inventory) -> bool:
    from_file = inventory.auto_sync.skip_nfs_sync
    return True if from_file is None else from_file


def _default_interval(inventory: Inventory) -> float:
    return inventory.auto_sync.interval_seconds or 60.0


def _coordinator(env: _Env, inventory: Inventory | None) -> str | None:
    name = env.get("RINGRIFT_COORDINATOR_NODE")
    if name is not None and inventory is not None and name not in inventory:
        raise env.fail("RINGRIFT_COORDINATOR_NODE", f"is not a host in inventory "
                       f"{inventory.source}; use one of: {_host_list(inventory)}")
    return name


class _HttpLimits(TypedDict):
    http_header_timeout: float
    http_idle_timeout: float
    http_body_timeout: float
    http_max_connections: int
    http_max_connections_per_address: int
    max_upload_bytes_in_flight: int | None
    max_merges_in_flight: int


def _http_limits(env: _Env) -> _HttpLimits:
    """The data server's guards against slow, flooding or oversized peers."""
    max_connections = env.integer("RINGRIFT_HTTP_MAX_CONNECTIONS", 1024, minimum=1)
    max_batch = env.integer("RINGRIFT_MAX_BATCH_BYTES", 64 * MIB, minimum=MIB)
    return _HttpLimits({
        "http_header_timeout": env.number("RINGRIFT_HTTP_HEADER_TIMEOUT", 10.0),
        "http_idle_timeout": env.number("RINGRIFT_HTTP_IDLE_TIMEOUT", 75.0),
        "http_body_timeout": env.number("RINGRIFT_HTTP_BODY_TIMEOUT", 30.0),
        "http_max_connections": max_connections,
        "http_max_connections_per_address": env.integer(
            "RINGRIFT_HTTP_MAX_CONNECTIONS_PER_ADDRESS", min(64, max_connections), minimum=1,
            maximum=max_connections),
        "max_upload_bytes_in_flight": env.optional_integer(
            "RINGRIFT_MAX_UPLOAD_BYTES_IN_FLIGHT", minimum=max_batch),
        "max_merges_in_flight": env.integer("RINGRIFT_MAX_MERGES_IN_FLIGHT", 2, minimum=1,
                                            maximum=64),
    })


class _Bandwidth(TypedDict):
    bandwidth_limit_mbps: float | None
    max_transfers: int
    max_transfers_per_peer: int


def _bandwidth(env: _Env, inventory: Inventory, node_id: str) -> _Bandwidth:
    """The total rate (the env replaces the inventory's; 0 is no limit) and the transfer caps."""
    if env.get("RINGRIFT_BANDWIDTH_LIMIT_MBPS") is None:
        total = inventory.total_bandwidth_mbps(node_id)
    else:
        total = env.number("RINGRIFT_BANDWIDTH_LIMIT_MBPS", 0.0, allow_zero=True) or None
    max_transfers = env.integer("RINGRIFT_MAX_TRANSFERS", 32, minimum=1)
    return _Bandwidth({
        "bandwidth_limit_mbps": total,
        "max_transfers": max_transfers,
        "max_transfers_per_peer": env.integer("RINGRIFT_MAX_TRANSFERS_PER_PEER",
                                              min(4, max_transfers), minimum=1,
                                              maximum=max_transfers),
    })


def _sendable_node_id(node_id: str) -> str:
    """A node id peers accept as a batch's source_node (else every push would be refused)."""
    try:
        return validate_source_node(node_id)
    except BadInputError as exc:
        raise ConfigError(f"RINGRIFT_NODE_ID (or the hostname): {exc}") from None


class _SshSettings(TypedDict):
    transport_order: tuple[str, ...]
    transport_chains: TransportChains
    ssh_known_hosts: Path
    ssh_max_channels: int
    ssh_keepalive_interval: float
    ssh_keepalive_count_max: int
    ssh_connect_timeout: float


def _ssh_settings(env: _Env, cwd: Path) -> _SshSettings:
    """Which transports reach peers, and how the SSH one connects."""
    order = env.get("RINGRIFT_TRANSPORT_ORDER")
    try:
        transport_order = parse_transport_order(order.split(",")) if order else ("http",)
    except ValueError as exc:
        raise env.fail("RINGRIFT_TRANSPORT_ORDER", str(exc)) from None
    chains = _transport_chains(env, transport_order)
    known_hosts = env.get("RINGRIFT_SSH_KNOWN_HOSTS") or "~/.ssh/known_hosts"
    return _SshSettings(
        transport_order=chains.games,
        transport_chains=chains,
        ssh_known_hosts=_resolve(known_hosts, cwd, "RINGRIFT_SSH_KNOWN_HOSTS"),
        ssh_max_channels=env.integer("RINGRIFT_SSH_MAX_CHANNELS", 10, minimum=1, maximum=1000),
        ssh_keepalive_interval=env.number("RINGRIFT_SSH_KEEPALIVE_INTERVAL", 3.0),
        ssh_keepalive_count_max=env.integer("RINGRIFT_SSH_KEEPALIVE_COUNT_MAX", 3, minimum=1),
        ssh_connect_timeout=env.number("RINGRIFT_SSH_CONNECT_TIMEOUT", 10.0),
    )


def _transport_chains(env: _Env, transport_order: tuple[str, ...]) -> TransportChains:
    large = env.integer("RINGRIFT_LARGE_FILE_MB", 64, minimum=1) << 20
    try:
        chains = parse_chains(env.get("RINGRIFT_TRANSPORT_CHAINS") or "",
                              games_default=transport_order, large_file_bytes=large)
    except ValueError as exc:
        raise env.fail("RINGRIFT_TRANSPORT_CHAINS", str(exc)) from None
    if "games" in chains.named and env.get("RINGRIFT_TRANSPORT_ORDER") is not None:
        raise env.fail("RINGRIFT_TRANSPORT_CHAINS", "sets games= while RINGRIFT_TRANSPORT_ORDER "
                       "is set too; keep the games order in one of them")
    return chains


class _CircuitSettings(TypedDict):
    circuit_failure_threshold: int
    circuit_recovery: float
    circuit_recovery_max: float


def _circuit_settings(env: _Env) -> _CircuitSettings:
    """When a peer's circuit breaker opens and how long it waits before a probe."""
    recovery = env.number("RINGRIFT_CIRCUIT_RECOVERY", 5.0)
    recovery_max = env.number("RINGRIFT_CIRCUIT_RECOVERY_MAX", max(300.0, recovery))
    if recovery_max < recovery:
        raise env.fail("RINGRIFT_CIRCUIT_RECOVERY_MAX", f"is below RINGRIFT_CIRCUIT_RECOVERY="
                       f"{recovery:g}; use a number of seconds >= it")
    return _CircuitSettings(
        circuit_failure_threshold=env.integer("RINGRIFT_CIRCUIT_FAILURE_THRESHOLD", 5, minimum=1,
                                              maximum=1000),
        circuit_recovery=recovery,
        circuit_recovery_max=recovery_max,
    )

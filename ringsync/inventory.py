"""The cluster inventory: RingRift's distributed_hosts.yaml, read unchanged."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yarl import URL

from ringsync.errors import ConfigError

DEFAULT_P2P_PORT = 8770
OFFLINE_STATUSES = frozenset(
    {"offline", "retired", "terminated", "disabled", "decommissioned", "stopped"}
)
_MAX_SHOWN = 80  # characters of a bad value quoted in an error message
_GLOB_WILDCARD = re.compile(r"\[[^\]]*\]|[*?]")
_NO_LIMIT = "(0: no limit)"

# Roles in RingRift's distributed_hosts.yaml.example and .template.yaml, the design's
# nn_training_primary, and the plain kinds. Upstream classifies a role by substring, so any
# role containing one of ROLE_KINDS is accepted too (e.g. gpu_training_h100).
KNOWN_ROLES = (
    "coordinator", "gpu_training_primary", "gpu_training_selfplay", "nn_training_primary",
    "gpu_selfplay", "cpu_selfplay", "proxy", "selfplay", "training", "storage", "aggregator",
)
ROLE_KINDS = ("coordinator", "training", "selfplay", "storage", "aggregator")
DEFAULT_ROLE = "selfplay"  # upstream's sync_router: a host without a role is a selfplay node
ADDRESS_FIELDS = ("ssh_host", "tailscale_ip", "p2p_host")
# How a peer can be reached, in the order tried (hosts.<name>.transport, RINGRIFT_TRANSPORT_ORDER).
TRANSPORT_NAMES = ("http", "ssh")
# Text a template leaves in an address until someone fills it in.
_PLACEHOLDER = re.compile(
    r"[<>{}]|\btodo\b|\bfixme\b|\bchangeme\b|\bplaceholder\b|\.\.\.",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Host:
    """One node of the cluster as the inventory describes it."""

    name: str
    role: str = DEFAULT_ROLE
    status: str = "ready"
    ssh_host: str | None = None
    ssh_port: int = 22
    ssh_user: str | None = None
    ssh_key: str | None = None
    tailscale_ip: str | None = None
    p2p_host: str | None = None  # ringsync extension
    p2p_port: int = DEFAULT_P2P_PORT  # ringsync extension
    is_ephemeral: bool = False
    skip_sync_receive: bool = False
    selfplay_enabled: bool = False
    training_enabled: bool = False
    p2p_enabled: bool = True
    bandwidth_mbps: float | None = None
    nfs_enabled: bool = False  # nfs_enabled or has_nfs in the file: the host mounts shared NFS
    transport: tuple[str, ...] = ()  # ringsync extension; empty: RINGRIFT_TRANSPORT_ORDER decides
    models_dir: str | None = None  # ringsync extension: its RINGRIFT_MODELS_DIR, for rsync
    training_dir: str | None = None  # ringsync extension: its RINGRIFT_TRAINING_DIR, for rsync

    @property
    def address(self) -> str:
        """Where this node's data server is reached: p2p_host, tailscale_ip, ssh_host."""
        return self.p2p_host or self.tailscale_ip or self.ssh_host or "127.0.0.1"

    def url(self, path: str) -> URL:
        """``path`` on this node's data server."""
        return URL.build(scheme="http", host=self.address, port=self.p2p_port, path=path)

    @property
    def is_coordinator(self) -> bool:
        """The coordinator manages the cluster and never receives games."""
        return "coordinator" in self.role.lower()

    @property
    def is_trainer(self) -> bool:
        """Training nodes want fresh games first."""
        return "training" in self.role.lower() or self.training_enabled

    @property
    def is_storage(self) -> bool:
        """Storage and aggregator nodes keep replicas of games."""
        role = self.role.lower()
        return "storage" in role or "aggregator" in role

    @property
    def is_online(self) -> bool:
        """False for hosts whose status says they are gone or switched off."""
        return self.status.strip().lower() not in OFFLINE_STATUSES


@dataclass(frozen=True, slots=True)
class ExternalStorage:
    """One ``sync_routing.allowed_external_storage`` entry: a host allowed to hold copies."""

    host: str
    path: str | None = None
    receive_games: bool = True
    receive_npz: bool = True
    receive_models: bool = True
    subdirs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SyncRouting:
    """The top-level ``sync_routing:`` section (defaults are upstream's)."""

    replication_target: int = 2
    excluded_hosts: frozenset[str] = frozenset()
    priority_hosts: tuple[str, ...] = ()  # served first, counted as training nodes
    max_disk_usage_percent: float = 70.0
    target_disk_usage_percent: float = 60.0
    min_free_disk_percent: float = 15.0
    underserved_configs: tuple[str, ...] = ()
    allowed_external_storage: tuple[ExternalStorage, ...] = ()
    s3_enabled: bool = False

    def external_storage(self, host: str) -> ExternalStorage | None:
        return next((e for e in self.allowed_external_storage if e.host == host), None)


@dataclass(frozen=True, slots=True)
class AutoSyncSection:
    """The top-level ``auto_sync:`` section (defaults are upstream's)."""

    enabled: bool = True
    interval_seconds: float | None = None
    gossip_interval_seconds: float | None = None
    skip_nfs_sync: bool | None = None  # None: not in the file (RINGRIFT_SKIP_NFS_SYNC decides)
    max_concurrent_syncs: int | None = None
    min_games_to_sync: int | None = None
    bandwidth_limit_mbps: float | None = None  # all of this node's sends; 0: no limit
    exclude_hosts: frozenset[str] = frozenset()  # these nodes skip their own auto-sync cycles
    host_bandwidth_overrides: Mapping[str, float] = field(default_factory=dict)  # glob -> Mbit/s

    def bandwidth_override(self, host: str) -> float | None:
        """The limit of the most specific ``host_bandwidth_overrides`` glob matching ``host``."""
        pattern = most_specific_pattern(host, self.host_bandwidth_overrides)
        return None if pattern is None else self.host_bandwidth_overrides[pattern]


@dataclass(frozen=True, slots=True)
class Inventory:
    """All hosts plus the cluster-wide sections; built once, passed down."""

    hosts: dict[str, Host] = field(default_factory=dict)
    sync_routing: SyncRouting = SyncRouting()
    auto_sync: AutoSyncSection = AutoSyncSection()
    source: Path | None = None
    notes: tuple[str, ...] = ()  # harmless oddities worth a line in the start-up log

    @classmethod
    def single_node(cls, name: str) -> Inventory:
        """The inventory of a node that runs without a cluster config."""
        return cls(hosts={name: Host(name=name)})

    @property
    def host_names(self) -> list[str]:
        return list(self.hosts)

    def get(self, name: str) -> Host | None:
        return self.hosts.get(name)

    def peer_bandwidth_mbps(self, name: str) -> float | None:
        """The limit on sends to one peer, None for none: an ``auto_sync.host_bandwidth_overrides``
        match, else the host's ``bandwidth_mbps``; 0 in either place means no limit."""
        override = self.auto_sync.bandwidth_override(name)
        if override is not None:
            return override or None
        host = self.hosts.get(name)
        return (host.bandwidth_mbps or None) if host is not None else None

    def total_bandwidth_mbps(self, node: str) -> float | None:
        """The limit on all of ``node``'s sends: ``auto_sync.bandwidth_limit_mbps``, capped by
        the node's own ``bandwidth_mbps`` (its link); None when neither sets one."""
        host = self.hosts.get(node)
        limits = [self.auto_sync.bandwidth_limit_mbps, host.bandwidth_mbps if host else None]
        return min((v for v in limits if v), default=None)

    def __contains__(self, name: object) -> bool:
        return name in self.hosts


def most_specific_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """Which of ``patterns`` (globs, case-sensitive) decides for ``name``, or None.

    The most specific match wins: the exact name over any glob; then the glob with more
    literal characters (``vast-gh200-*`` over ``vast-*``); then the one with fewer ``*``
    (``vast-?`` over ``vast-*``); equal ranks: the first in the file.
    """
    def rank(pattern: str) -> tuple[bool, int, int]:
        exact = not _GLOB_WILDCARD.search(pattern)
        return exact, len(_GLOB_WILDCARD.sub("", pattern)), -pattern.count("*")
    matches = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
    return max(matches, key=rank, default=None)  # max keeps the first of equal ranks


def load_inventory(path: Path) -> Inventory:
    """Read and check a distributed_hosts.yaml; every problem is a ConfigError."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"inventory {source}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"inventory {source}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"inventory {source}: cannot read it ({exc.strerror or exc})") from exc
    inventory = parse_inventory(_parse_yaml(text, source), source=source)
    return dataclasses.replace(inventory, source=path)


def parse_inventory(data: object, *, source: str) -> Inventory:
    """Build an Inventory from an already-parsed YAML document."""
    if data is None:
        raise ConfigError(f"inventory {source}: the file is empty; it needs a hosts: mapping")
    if not isinstance(data, Mapping):
        raise _Fields(source, "").fail(
            "(top level)", data, "is not a mapping; the file must start with hosts:"
        )
    top = _Fields(source, "", data)
    inventory = Inventory(
        hosts=_parse_hosts(source, data.get("hosts")),
        sync_routing=_parse_sync_routing(top.section("sync_routing")),
        auto_sync=_parse_auto_sync(top.section("auto_sync")),
    )
    notes = _unknown_references(inventory) + _unenforced(inventory)
    return dataclasses.replace(inventory, notes=notes)


def _unknown_references(inventory: Inventory) -> tuple[str, ...]:
    """Routing lists naming no host: tolerated (upstream does), but said at start-up."""
    routing, auto = inventory.sync_routing, inventory.auto_sync
    lists: list[tuple[str, list[str]]] = [
        ("sync_routing.excluded_hosts", sorted(routing.excluded_hosts)),
        ("sync_routing.priority_hosts", list(routing.priority_hosts)),
        ("sync_routing.allowed_external_storage", [e.host for e in routing.allowed_external_storage]),
        ("auto_sync.exclude_hosts", sorted(auto.exclude_hosts)),
    ]
    notes = []
    for where, names in lists:
        for name in names:
            if name not in inventory.hosts:
                close = difflib.get_close_matches(name, list(inventory.hosts), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                notes.append(f"{where} names {name!r}, which is not under hosts:{hint}; it has no effect")
    return tuple(notes)


def _unenforced(inventory: Inventory) -> tuple[str, ...]:
    """Keys set in the file that ringsync reads but does not act on, so none is silently ignored."""
    auto, routing = inventory.auto_sync, inventory.sync_routing
    notes = []
    if auto.min_games_to_sync:
        notes.append(f"auto_sync.min_games_to_sync = {auto.min_games_to_sync} is not a gate in "
                     "ringsync: every completed game is pushed within moments of its commit "
                     "(a threshold that holds games back can block them indefinitely)")
    unused = {
        "auto_sync.max_concurrent_syncs": auto.max_concurrent_syncs,
        "auto_sync.gossip_interval_seconds": auto.gossip_interval_seconds,
        "sync_routing.underserved_configs": routing.underserved_configs or None,
        "sync_routing.s3.enabled": routing.s3_enabled or None,
    }
    notes += [f"{key} is set but not used by ringsync yet" for key, v in unused.items() if v]
    return tuple(notes)


def _parse_yaml(text: str, source: str) -> object:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # a safe loader: C-accelerated when available
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc, text)
        raise ConfigError(f"inventory {source}: not valid YAML: {problem}") from exc


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return str(problem)
    lines = text.splitlines()
    line = lines[mark.line].strip() if mark.line < len(lines) else ""
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}: {line!r}"


def _parse_hosts(source: str, raw: object) -> dict[str, Host]:
    top = _Fields(source, "")
    if raw is None:
        raise ConfigError(
            f"inventory {source}: hosts is missing or empty; add a hosts: mapping of name → fields"
        )
    if not isinstance(raw, Mapping):
        raise top.fail("hosts", raw, "is not a mapping; use name: {ssh_host: ..., role: ...}")
    if not raw:
        raise top.fail("hosts", raw, "is empty; list at least this node")
    hosts: dict[str, Host] = {}
    for key, fields in raw.items():
        name = _host_name(top, key)
        hosts[name] = _parse_host(source, name, fields)
    return hosts


def _is_name(value: object) -> bool:
    """Host names are strings; unquoted numeric names (``101:``) are accepted too."""
    return isinstance(value, str | int) and not isinstance(value, bool) and bool(str(value).strip())


def _host_name(top: _Fields, key: object) -> str:
    if not _is_name(key):
        raise top.fail("hosts", key, "has a host name that is not a string; quote it")
    return str(key)


def _parse_host(source: str, name: str, raw: object) -> Host:
    if not isinstance(raw, Mapping):
        raise _Fields(source, "hosts.").fail(name, raw, "is not a mapping of host fields")
    f = _Fields(source, f"hosts.{name}.", raw)
    for key in ADDRESS_FIELDS:
        _check_address(f, key)
    return Host(
        name=name,
        role=_role(f),
        status=f.text("status") or "ready",
        ssh_host=f.text("ssh_host"),
        ssh_port=f.port("ssh_port", 22),
        ssh_user=f.text("ssh_user"),
        ssh_key=f.text("ssh_key"),
        tailscale_ip=f.text("tailscale_ip"),
        p2p_host=f.text("p2p_host"),
        p2p_port=f.port("p2p_port", DEFAULT_P2P_PORT),
        is_ephemeral=f.flag("is_ephemeral", False),
        skip_sync_receive=f.flag("skip_sync_receive", False),
        selfplay_enabled=f.flag("selfplay_enabled", False),
        training_enabled=f.flag("training_enabled", False),
        p2p_enabled=f.flag("p2p_enabled", True),
        bandwidth_mbps=f.number("bandwidth_mbps", minimum=0.0, allow_zero=True, hint=_NO_LIMIT),
        nfs_enabled=f.flag("nfs_enabled", False) or f.flag("has_nfs", False),
        transport=_transport_order(f),
        models_dir=_absolute(f, "models_dir"),
        training_dir=_absolute(f, "training_dir"),
    )


def _absolute(f: _Fields, key: str) -> str | None:
    """A directory on that host, as rsync names it there: an absolute path."""
    path = f.text(key)
    if path is not None and not path.startswith("/"):
        raise f.fail(key, path, "is not an absolute path; give the directory as that host sees it "
                                "(its RINGRIFT_MODELS_DIR / RINGRIFT_TRAINING_DIR), e.g. "
                                "/home/ubuntu/ringrift/ai-service/models")
    return path


def _transport_order(f: _Fields) -> tuple[str, ...]:
    """``transport: ssh`` or ``transport: http,ssh`` (or a YAML list): tried in this order."""
    raw = f.raw("transport")
    if raw is None:
        return ()
    names = raw if isinstance(raw, list) else str(raw).split(",")
    try:
        return parse_transport_order(names)
    except ValueError as exc:
        raise f.fail("transport", raw, str(exc)) from None


def parse_transport_order(names: Sequence[object]) -> tuple[str, ...]:
    """Transport names in the order to try them; ValueError says what is allowed."""
    order = tuple(str(n).strip().lower() for n in names if str(n).strip())
    if not order or any(n not in TRANSPORT_NAMES for n in order) or len(set(order)) < len(order):
        raise ValueError(f"is not a list of transports; use one or more of {', '.join(TRANSPORT_NAMES)} "
                         "without repeats, in the order to try them (e.g. http,ssh)")
    return order


def _role(f: _Fields) -> str:
    """The host's role; one that is neither known nor classifiable is a typo, not a new kind."""
    role = f.text("role")
    if role is None:
        return DEFAULT_ROLE
    lowered = role.lower()
    if lowered in KNOWN_ROLES or any(kind in lowered for kind in ROLE_KINDS):
        return role
    close = difflib.get_close_matches(lowered, KNOWN_ROLES, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise f.fail("role", role, f"is not a known role; {hint}known roles: {', '.join(KNOWN_ROLES)} "
                 "(or any role containing 'training', 'selfplay' or 'storage')")


def _check_address(f: _Fields, key: str) -> None:
    value = f.text(key)
    if value is not None and (_PLACEHOLDER.search(value) or _is_masked_ip(value)):
        raise f.fail(key, value, "is a template placeholder, not an address; put this host's real "
                     "address there (an IP or DNS name) or remove the field")


def _is_masked_ip(value: str) -> bool:
    """x.x.x.x, 100.x.x.x and the like: an IPv4 address with octets left as x."""
    parts = value.lower().split(".")
    if len(parts) != 4 or not all(p.isdigit() or set(p) == {"x"} for p in parts if p):
        return False
    return any(p and set(p) == {"x"} for p in parts)


def _parse_sync_routing(f: _Fields) -> SyncRouting:
    return SyncRouting(
        replication_target=f.integer("replication_target", 2, minimum=1),
        excluded_hosts=f.names("excluded_hosts"),
        priority_hosts=tuple(dict.fromkeys(f.name_list("priority_hosts"))),
        max_disk_usage_percent=f.percent("max_disk_usage_percent", 70.0),
        target_disk_usage_percent=f.percent("target_disk_usage_percent", 60.0),
        min_free_disk_percent=f.percent("min_free_disk_percent", 15.0),
        underserved_configs=tuple(f.name_list("underserved_configs")),
        allowed_external_storage=_parse_external_storage(f),
        s3_enabled=f.section("s3").flag("enabled", False) if f.has("s3") else False,
    )


def _parse_external_storage(routing: _Fields) -> tuple[ExternalStorage, ...]:
    out = []
    for i, f in enumerate(routing.mappings("allowed_external_storage")):
        host = f.text("host")
        if host is None:
            raise ConfigError(f"inventory {routing.source}: sync_routing.allowed_external_storage[{i}]"
                              " has no host:; name the host that may hold the copies")
        out.append(ExternalStorage(
            host=host, path=f.text("path"),
            receive_games=f.flag("receive_games", True),
            receive_npz=f.flag("receive_npz", True),
            receive_models=f.flag("receive_models", True),
            subdirs=f.text_map("subdirs"),
        ))
    return tuple(out)


def _parse_auto_sync(f: _Fields) -> AutoSyncSection:
    return AutoSyncSection(
        enabled=f.flag("enabled", True),
        interval_seconds=f.positive("interval_seconds"),
        gossip_interval_seconds=f.positive("gossip_interval_seconds"),
        skip_nfs_sync=f.flag("skip_nfs_sync", True) if f.has("skip_nfs_sync") else None,
        max_concurrent_syncs=f.integer_or_none("max_concurrent_syncs", minimum=1),
        min_games_to_sync=f.integer_or_none("min_games_to_sync", minimum=0),
        bandwidth_limit_mbps=f.number("bandwidth_limit_mbps", minimum=0.0, allow_zero=True,
                                      hint=_NO_LIMIT),
        exclude_hosts=f.names("exclude_hosts"),
        host_bandwidth_overrides=f.number_map("host_bandwidth_overrides"),
    )


class _Fields:
    """Typed, lenient reads of one mapping, with errors that name the field path."""

    def __init__(
        self, source: str, prefix: str, raw: Mapping[object, object] | None = None
    ) -> None:
        self._source = source
        self._prefix = prefix
        self._raw: Mapping[object, object] = raw or {}

    def fail(self, key: str, value: object, allowed: str) -> ConfigError:
        shown = repr(value)
        if len(shown) > _MAX_SHOWN:
            shown = shown[: _MAX_SHOWN - 3] + "..."
        return ConfigError(f"inventory {self._source}: {self._prefix}{key} = {shown} {allowed}")

    @property
    def source(self) -> str:
        return self._source

    def has(self, key: str) -> bool:
        return self._raw.get(key) is not None

    def raw(self, key: str) -> object:
        return self._raw.get(key)

    def section(self, key: str) -> _Fields:
        value = self._raw.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self.fail(key, value, "is not a mapping; use key: value lines under it")
        return _Fields(self._source, f"{self._prefix}{key}.", value)

    def text(self, key: str) -> str | None:
        value = self._raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return value.strip() or None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. an unquoted numeric user name
        raise self.fail(key, value, "is not a string")

    def flag(self, key: str, default: bool) -> bool:
        value = self._raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise self.fail(key, value, "is not a boolean; use true or false")

    def port(self, key: str, default: int) -> int:
        port = self._int_or_none(key, "is not a port; use an integer 1-65535")
        if port is None:
            return default
        if not 1 <= port <= 65535:
            raise self.fail(key, self._raw.get(key), "is not a port; use an integer 1-65535")
        return port

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        allowed = f"is not allowed; use an integer >= {minimum}"
        value = self._int_or_none(key, allowed)
        if value is None:
            return default
        if value < minimum:
            raise self.fail(key, self._raw.get(key), allowed)
        return value

    def number(self, key: str, *, minimum: float, allow_zero: bool, hint: str = "") -> float | None:
        bound = ">= 0" if allow_zero else "> 0"
        allowed = f"is not allowed; use a number {bound}" + (f" {hint}" if hint else "")
        raw = self._raw.get(key)
        if raw is None:
            return None
        value = _to_float(raw)
        if value is None or value < minimum or (value == minimum and not allow_zero):
            raise self.fail(key, raw, allowed)
        return value

    def names(self, key: str) -> frozenset[str]:
        raw = self._raw.get(key)
        if raw is None:
            return frozenset()
        if not isinstance(raw, list) or not all(_is_name(n) for n in raw):
            raise self.fail(key, raw, "is not a list of host names; use [name-1, name-2]")
        return frozenset(str(n) for n in raw)

    def positive(self, key: str) -> float | None:
        return self.number(key, minimum=0.0, allow_zero=False)

    def integer_or_none(self, key: str, *, minimum: int) -> int | None:
        return self.integer(key, minimum, minimum=minimum) if self.has(key) else None

    def percent(self, key: str, default: float) -> float:
        raw = self._raw.get(key)
        if raw is None:
            return default
        value = _to_float(raw)
        if value is None or not 0 <= value <= 100:
            raise self.fail(key, raw, "is not a percentage; use a number 0-100")
        return value

    def name_list(self, key: str) -> list[str]:
        """A list of names in file order (order matters for priority_hosts)."""
        raw = self._raw.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(_is_name(n) for n in raw):
            raise self.fail(key, raw, "is not a list of names; use [name-1, name-2]")
        return [str(n) for n in raw]

    def mappings(self, key: str) -> list[_Fields]:
        raw = self._raw.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(e, Mapping) for e in raw):
            raise self.fail(key, raw, "is not a list of mappings; use - host: name lines")
        return [_Fields(self._source, f"{self._prefix}{key}[{i}].", e) for i, e in enumerate(raw)]

    def text_map(self, key: str) -> dict[str, str]:
        raw = self._raw.get(key)
        if raw is None:
            return {}
        if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
            raise self.fail(key, raw, "is not a mapping of names to paths; use games: dir lines")
        return {str(k): v for k, v in raw.items()}

    def number_map(self, key: str) -> dict[str, float]:
        """Host globs (``vast-*``) to Mbit/s >= 0."""
        raw = self._raw.get(key)
        if raw is None:
            return {}
        values = {str(k).strip(): _to_float(v) for k, v in raw.items() if _is_name(k)} \
            if isinstance(raw, Mapping) else {}
        if not isinstance(raw, Mapping) or len(values) != len(raw) \
                or any(v is None or v < 0 for v in values.values()):
            raise self.fail(key, raw, "is not a mapping of host patterns (globs such as vast-*) "
                            f"to Mbit/s >= 0 {_NO_LIMIT}; e.g. \"vast-*\": 50")
        return {k: v for k, v in values.items() if v is not None}

    def _int_or_none(self, key: str, allowed: str) -> int | None:
        raw = self._raw.get(key)
        if raw is None:
            return None
        value = _to_int(raw)
        if value is None:
            raise self.fail(key, raw, allowed)
        return value


def _to_int(raw: object) -> int | None:
    """An int from a YAML int or a numeric string ("22"); None if it is neither."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            return None
    return None


def _to_float(raw: object) -> float | None:
    """A finite float from a YAML number or a numeric string; None otherwise."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None

"""The cluster inventory: RingRift's distributed_hosts.yaml, read unchanged."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ringsync.errors import ConfigError

DEFAULT_P2P_PORT = 8770
OFFLINE_STATUSES = frozenset(
    {"offline", "retired", "terminated", "disabled", "decommissioned", "stopped"}
)
_MAX_SHOWN = 80  # characters of a bad value quoted in an error message


@dataclass(frozen=True, slots=True)
class Host:
    """One node of the cluster as the inventory describes it."""

    name: str
    role: str = "unknown"
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

    @property
    def address(self) -> str:
        """Where this node's data server is reached: p2p_host, tailscale_ip, ssh_host."""
        return self.p2p_host or self.tailscale_ip or self.ssh_host or "127.0.0.1"

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
class SyncRouting:
    """The top-level ``sync_routing:`` section."""

    replication_target: int = 2
    excluded_hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AutoSyncSection:
    """The top-level ``auto_sync:`` section (fields ringsync uses)."""

    enabled: bool = True
    interval_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Inventory:
    """All hosts plus the cluster-wide sections; built once, passed down."""

    hosts: dict[str, Host] = field(default_factory=dict)
    sync_routing: SyncRouting = SyncRouting()
    auto_sync: AutoSyncSection = AutoSyncSection()
    source: Path | None = None

    @classmethod
    def single_node(cls, name: str) -> Inventory:
        """The inventory of a node that runs without a cluster config."""
        return cls(hosts={name: Host(name=name)})

    @property
    def host_names(self) -> list[str]:
        return list(self.hosts)

    def get(self, name: str) -> Host | None:
        return self.hosts.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.hosts


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
    return Inventory(
        hosts=_parse_hosts(source, data.get("hosts")),
        sync_routing=_parse_sync_routing(top.section("sync_routing")),
        auto_sync=_parse_auto_sync(top.section("auto_sync")),
    )


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
    return Host(
        name=name,
        role=f.text("role") or "unknown",
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
        bandwidth_mbps=f.number("bandwidth_mbps", minimum=0.0, allow_zero=True),
    )


def _parse_sync_routing(f: _Fields) -> SyncRouting:
    target = f.integer("replication_target", 2, minimum=1)
    return SyncRouting(replication_target=target, excluded_hosts=f.names("excluded_hosts"))


def _parse_auto_sync(f: _Fields) -> AutoSyncSection:
    interval = f.number("interval_seconds", minimum=0.0, allow_zero=False)
    return AutoSyncSection(enabled=f.flag("enabled", True), interval_seconds=interval)


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

    def number(self, key: str, *, minimum: float, allow_zero: bool) -> float | None:
        bound = ">= 0" if allow_zero else "> 0"
        allowed = f"is not allowed; use a number {bound}"
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

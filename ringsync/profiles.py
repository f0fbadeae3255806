"""Node profiles: which daemon types a node runs, chosen by name or by the node's role."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from ringsync.daemons.base import DaemonType
from ringsync.errors import ConfigError
from ringsync.inventory import Host

_PACKAGE = "ringsync._profiles"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    daemons: tuple[DaemonType, ...]


def profile_names() -> list[str]:
    files = resources.files(_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def load_profile(name: str) -> Profile:
    names = profile_names()
    if name not in names:
        raise ConfigError(f"unknown profile {name!r}; choose one of: {', '.join(names)}")
    raw = yaml.safe_load(resources.files(_PACKAGE).joinpath(f"{name}.yaml").read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("daemons"), list):
        raise ConfigError(f"profile {name}: expected a mapping with a 'daemons' list")
    return Profile(name, str(raw.get("description", "")), parse_daemon_types(raw["daemons"]))


def parse_daemon_types(values: list[object]) -> tuple[DaemonType, ...]:
    allowed = ", ".join(t.value for t in DaemonType)
    out = []
    for value in values:
        try:
            out.append(DaemonType(str(value).lower()))
        except ValueError:
            raise ConfigError(f"unknown daemon type {value!r}; choose from: {allowed}") from None
    return tuple(dict.fromkeys(out))


def profile_for_host(host: Host | None, *, is_coordinator: bool) -> str:
    """The profile a node runs when none is named: it follows the inventory role."""
    if is_coordinator:
        return "coordinator"
    if host is None:
        return "sync-only"
    if host.is_trainer:
        return "training"
    if "selfplay" in host.role or host.selfplay_enabled:
        return "selfplay"
    return "sync-only"

"""Which transport reaches a peer: the inventory's transport field, RINGRIFT_TRANSPORT_ORDER, fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringsync.errors import (
    ConfigError,
    PeerRefusedError,
    PeerRejectedError,
    PeerUnreachableError,
    TransportError,
)
from ringsync.inventory import Host, Inventory, parse_inventory
from ringsync.policy.breaker import Breakers
from ringsync.protocol.results import MergeResult
from ringsync.settings import Settings, load_settings
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport
from ringsync.transport.select import TransportChain, build_transport


class Fake:
    """Reaches the peers in ``up``; refuses those in ``refuses``; counts calls."""

    def __init__(self, name: str, up: set[str], refuses: frozenset[str] = frozenset()) -> None:
        self.name, self.up, self.refuses, self.calls = name, up, refuses, 0

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.calls += 1
        if peer.name in self.refuses:
            raise PeerRefusedError(peer.name, "HTTP 401: wrong token")
        if peer.name not in self.up:
            raise PeerUnreachableError(peer.name, f"{self.name} cannot reach it")
        return MergeResult(inserted=1, duplicates=0)

    async def peer_data_dir_id(self, peer: Host) -> str:
        await self.push_games(peer, b"", "")
        return self.name * 8

    async def close(self) -> None:
        return None


def chain(http: Fake, ssh: Fake, default: tuple[str, ...] = ("http", "ssh")) -> TransportChain:
    transports: dict[str, GameTransport] = {"http": http, "ssh": ssh}
    return TransportChain(transports, default, Breakers())


async def test_falls_back_when_unreachable_and_keeps_the_configured_order() -> None:
    http, ssh = Fake("http", up=set()), Fake("ssh", up={"t1"})
    c = chain(http, ssh)
    peer = Host(name="t1")
    assert (await c.push_games(peer, b"x", "d")).inserted == 1
    assert (http.calls, ssh.calls) == (1, 1)
    assert await c.peer_data_dir_id(peer) == "ssh" * 8
    # HTTP is tried again: its breaker, not the last success, decides when it is skipped
    # (tests/unit/test_chain_breakers.py).
    assert (http.calls, ssh.calls) == (2, 2)
    http.up.add("t1")
    ssh.up.clear()
    assert (await c.push_games(peer, b"x", "d")).inserted == 1
    assert (http.calls, ssh.calls) == (3, 2)
    assert c.order(peer) == ["http", "ssh"]


async def test_a_refusal_is_final_and_all_failures_are_named() -> None:
    http, ssh = Fake("http", up=set(), refuses=frozenset({"t1"})), Fake("ssh", up={"t1"})
    with pytest.raises(PeerRejectedError):
        await chain(http, ssh).push_games(Host(name="t1"), b"x", "d")
    assert ssh.calls == 0
    with pytest.raises(TransportError) as err:
        await chain(Fake("http", set()), Fake("ssh", set())).push_games(Host(name="t2"), b"x", "d")
    assert str(err.value) == "t2: http: http cannot reach it; ssh: ssh cannot reach it"


async def test_a_host_transport_field_wins_over_the_default_order() -> None:
    http, ssh = Fake("http", up={"t1"}), Fake("ssh", up={"t1"})
    c = chain(http, ssh, default=("http",))
    await c.push_games(Host(name="t1", transport=("ssh",)), b"x", "d")
    assert (http.calls, ssh.calls) == (0, 1)
    with pytest.raises(TransportError) as err:  # one transport: its own error, unwrapped
        await chain(Fake("http", set()), ssh, default=("http",)).push_games(Host(name="t9"), b"", "")
    assert str(err.value) == "t9: http cannot reach it"


async def test_plain_http_unless_some_peer_uses_ssh(tmp_path: Path) -> None:
    hosts = {"a": Host(name="a"), "b": Host(name="b")}
    plain = build_transport(Settings(node_id="a", data_dir=tmp_path, inventory=Inventory(hosts=hosts)),
                            Breakers())
    assert isinstance(plain._transports["http"], HttpTransport)
    assert set(plain._transports) == {"http"}
    await plain.close()
    hosts["b"] = Host(name="b", transport=("ssh",))
    mixed = build_transport(Settings(node_id="a", data_dir=tmp_path, inventory=Inventory(hosts=hosts)),
                            Breakers())
    assert set(mixed._transports) == {"http", "ssh"}
    assert mixed.order(hosts["b"]) == ["ssh"]
    assert mixed.order(hosts["a"]) == ["http"]
    await mixed.close()


@pytest.mark.parametrize(("raw", "order"), [("ssh", ("ssh",)), ("http, ssh", ("http", "ssh")),
                                            (["SSH", "http"], ("ssh", "http"))])
def test_inventory_transport_field(raw: object, order: tuple[str, ...]) -> None:
    inv = parse_inventory({"hosts": {"t1": {"transport": raw}, "t2": {}}}, source="h.yaml")
    assert inv.hosts["t1"].transport == order
    assert inv.hosts["t2"].transport == ()


@pytest.mark.parametrize("raw", ["scp", "ssh,ssh", "", [], 7])
def test_a_bad_transport_field_names_the_field_and_the_choices(raw: object) -> None:
    with pytest.raises(ConfigError, match=r"hosts\.t1\.transport = .* use one or more of http, ssh"):
        parse_inventory({"hosts": {"t1": {"transport": raw}}}, source="h.yaml")


def test_ssh_settings_from_the_environment(tmp_path: Path) -> None:
    s = load_settings({"RINGRIFT_NODE_ID": "n", "RINGRIFT_TRANSPORT_ORDER": "ssh,http",
                       "RINGRIFT_SSH_KNOWN_HOSTS": "kh", "RINGRIFT_SSH_MAX_CHANNELS": "4",
                       "RINGRIFT_SSH_KEEPALIVE_INTERVAL": "1.5", "RINGRIFT_SSH_KEEPALIVE_COUNT_MAX": "2",
                       "RINGRIFT_SSH_CONNECT_TIMEOUT": "3"}, cwd=tmp_path)
    assert s.transport_order == ("ssh", "http")
    assert s.ssh_known_hosts == tmp_path / "kh"
    assert (s.ssh_max_channels, s.ssh_keepalive_interval, s.ssh_keepalive_count_max,
            s.ssh_connect_timeout) == (4, 1.5, 2, 3.0)
    defaults = load_settings({"RINGRIFT_NODE_ID": "n"}, cwd=tmp_path)
    assert defaults.transport_order == ("http",)
    assert defaults.ssh_known_hosts == Path("~/.ssh/known_hosts").expanduser()
    with pytest.raises(ConfigError, match="RINGRIFT_TRANSPORT_ORDER = 'rsync' is not a list"):
        load_settings({"RINGRIFT_NODE_ID": "n", "RINGRIFT_TRANSPORT_ORDER": "rsync"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="RINGRIFT_SSH_MAX_CHANNELS"):
        load_settings({"RINGRIFT_NODE_ID": "n", "RINGRIFT_SSH_MAX_CHANNELS": "0"}, cwd=tmp_path)

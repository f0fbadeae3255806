"""Fallback chains per data type and size (RINGRIFT_TRANSPORT_CHAINS) and each step's outcome."""

from __future__ import annotations

import os

import pytest

from ringsync.errors import ConfigError, PeerRefusedError
from ringsync.inventory import Host
from ringsync.policy.breaker import Breakers
from ringsync.policy.chains import Outcome, TransportChains, parse_chains
from ringsync.settings import load_settings
from ringsync.transport.base import GameTransport
from ringsync.transport.select import TransportChain
from tests.unit.test_transport_select import Fake

BASE = {"RINGRIFT_NODE_ID": "n1", "RINGRIFT_ENV_FILE": os.devnull}
MIB = 1 << 20


def test_each_data_type_has_its_order_and_large_files_their_own() -> None:
    c = parse_chains("games=ssh,http; models=http,rsync ;large_files=aria2,http", large_file_bytes=64 * MIB)
    assert c.for_games() == ("ssh", "http")
    assert c.for_file("models", 10 * MIB) == ("http", "rsync")
    assert c.for_file("training_data", 10 * MIB) == ("http",)  # not named: the default
    assert c.for_file("training_data", 64 * MIB) == ("aria2", "http")
    assert c.named == {"games", "models", "large_files"}
    assert parse_chains("").for_games() == ("http",)
    assert TransportChains().for_file("models", 1 << 30) == ("aria2", "http", "rsync")


@pytest.mark.parametrize(("text", "message"), [
    ("games=aria2", "games takes one or more of http, ssh"),
    ("models=http,http", "models takes one or more of http, ssh, aria2, rsync without repeats"),
    ("videos=http", "key one of games, models, training_data, large_files"),
    ("models", "write key=transport"),
    ("models=http;models=ssh", "names models twice"),
    ("models=", "models takes one or more"),
])
def test_bad_chains_say_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_chains(text)


def test_settings_read_the_chains_and_games_replaces_the_transport_order() -> None:
    s = load_settings({**BASE, "RINGRIFT_TRANSPORT_CHAINS": "games=http,ssh",
                       "RINGRIFT_LARGE_FILE_MB": "100"})
    assert s.transport_order == ("http", "ssh") == s.transport_chains.for_games()
    assert s.transport_chains.large_file_bytes == 100 * MIB
    assert s.describe()["transport_chains"] == {
        "games": ["http", "ssh"], "models": ["http"], "training_data": ["http"],
        "large_files": ["aria2", "http", "rsync"], "large_file_bytes": 100 * MIB}
    assert load_settings({**BASE, "RINGRIFT_TRANSPORT_ORDER": "ssh"}).transport_chains.games == ("ssh",)


@pytest.mark.parametrize(("env", "message"), [
    ({"RINGRIFT_TRANSPORT_CHAINS": "games=rsync"}, "RINGRIFT_TRANSPORT_CHAINS = 'games=rsync' has"),
    ({"RINGRIFT_TRANSPORT_CHAINS": "games=ssh", "RINGRIFT_TRANSPORT_ORDER": "http"},
     "RINGRIFT_TRANSPORT_ORDER is set too; keep the games order in one of them"),
    ({"RINGRIFT_LARGE_FILE_MB": "0"}, "RINGRIFT_LARGE_FILE_MB = '0' is out of range"),
])
def test_bad_chain_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({**BASE, **env})


async def test_every_step_of_the_games_chain_is_counted() -> None:
    seen: list[tuple[str, Outcome]] = []
    http, ssh = Fake("http", up=set()), Fake("ssh", up={"t1"}, refuses=frozenset({"t2"}))
    transports: dict[str, GameTransport] = {"http": http, "ssh": ssh}
    chain = TransportChain(transports, ("http", "ssh"), Breakers(),
                           on_attempt=lambda t, o: seen.append((t, o)))
    await chain.push_games(Host(name="t1", transport=("rsync", "http", "ssh")), b"x", "d")
    assert seen == [("rsync", Outcome.UNAVAILABLE), ("http", Outcome.NEXT), ("ssh", Outcome.OK)]
    seen.clear()
    with pytest.raises(PeerRefusedError):
        await chain.push_games(Host(name="t2"), b"x", "d")
    assert seen == [("http", Outcome.NEXT), ("ssh", Outcome.FAILED)]

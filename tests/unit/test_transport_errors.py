"""The transport boundary's typed errors: one decision, the same over HTTP and in memory."""

from __future__ import annotations

import pytest

from ringsync.errors import (
    AuthError,
    BadInputError,
    BatchRejectedError,
    CorruptDataError,
    PeerRefusedError,
    PeerRejectedError,
    PeerUnreachableError,
    ReceiveRefused,
    RingsyncError,
    StorageBusyError,
    StorageFullError,
    TooLargeError,
    TransientError,
    UnsafePathError,
    delivery_error,
)
from ringsync.inventory import Host
from ringsync.store.received_configs import TooManyConfigsError
from ringsync.transport.http.client import HttpTransport
from ringsync.transport.http.wire import error_for_status, status_for
from ringsync.transport.memory import MemoryTransport

RECEIVER_ERRORS: list[tuple[RingsyncError, type[Exception]]] = [
    (ReceiveRefused("coordinator"), PeerRefusedError),
    (AuthError("wrong token"), PeerRefusedError),
    (BadInputError("malformed"), BatchRejectedError),
    (UnsafePathError("../x"), BatchRejectedError),
    (TooLargeError("too big"), BatchRejectedError),
    (TooManyConfigsError("too many configs"), BatchRejectedError),
    (CorruptDataError("hash mismatch"), BatchRejectedError),
    (StorageFullError("disk full"), TransientError),
    (StorageBusyError("locked"), TransientError),
]


@pytest.mark.parametrize(("error", "expected"), RECEIVER_ERRORS)
def test_a_receivers_error_tells_the_sender_what_to_do(error: RingsyncError,
                                                       expected: type[Exception]) -> None:
    assert type(delivery_error("train-1", error)) is expected


@pytest.mark.parametrize(("error", "expected"), RECEIVER_ERRORS)
def test_http_carries_the_same_decision_through_its_status(error: RingsyncError,
                                                           expected: type[Exception]) -> None:
    status = status_for(error)
    assert 400 <= status < 600
    over_http = error_for_status("train-1", status, str(error))
    assert type(over_http) is expected
    assert over_http.peer == "train-1"
    assert f"HTTP {status}" in str(over_http)


@pytest.mark.parametrize(("status", "expected"), [
    (408, TransientError), (429, TransientError), (500, TransientError), (502, TransientError),
    (404, PeerRefusedError), (405, PeerRejectedError), (413, BatchRejectedError),
])
def test_statuses_no_receiver_error_maps_to(status: int, expected: type[Exception]) -> None:
    assert type(error_for_status("p", status, "x")) is expected


def test_an_unexpected_receiver_error_is_a_500() -> None:
    assert status_for(RingsyncError("bug")) == 500


async def test_the_memory_transport_raises_the_typed_errors_directly() -> None:
    class Refusing:
        def __init__(self, error: RingsyncError) -> None:
            self.error = error

        def receive(self, payload: bytes, digest: str) -> object:
            raise self.error

    transport = MemoryTransport()
    peer = Host("train-1")
    for error, expected in RECEIVER_ERRORS:
        transport.receivers["train-1"] = Refusing(error)  # type: ignore[assignment]
        with pytest.raises(expected) as caught:
            await transport.push_games(peer, b"x", "d")
        assert caught.value.__cause__ is error


async def test_http_to_a_port_nobody_listens_on_is_unreachable(unused_tcp_port: int) -> None:
    transport = HttpTransport("selfplay-1", None)
    try:
        with pytest.raises(PeerUnreachableError):
            await transport.push_games(Host("train-1", p2p_host="127.0.0.1",
                                            p2p_port=unused_tcp_port), b"x", "d")
    finally:
        await transport.close()

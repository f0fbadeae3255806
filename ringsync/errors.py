"""The ringsync error hierarchy, grouped by what the caller does about an error."""

from __future__ import annotations


class RingsyncError(Exception):
    """Root of every error ringsync raises on purpose."""


class ConfigError(RingsyncError):
    """A setting, env variable or inventory field is wrong; start-up stops.

    The message names the variable or field, the bad value (never a secret)
    and what is allowed.
    """


class TransportError(RingsyncError):
    """A transfer to or from a peer did not happen; the subclass says what the caller does.

    Raised at the transport boundary whatever carried the bytes (HTTP, SSH, in memory):
    callers branch on these classes, never on a wire status or a message.
    """

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class TransientError(TransportError):
    """The peer could not take it now (busy, storage full, broken transfer): retry later.

    The only kind that counts against a peer's circuit breaker.
    """


class PeerUnreachableError(TransientError):
    """The peer cannot be reached over this transport: try the next transport, else
    retry later."""


class PeerRejectedError(TransportError):
    """The peer answered and refused; sending the same thing again will not help."""


class BatchRejectedError(PeerRejectedError):
    """This batch is bad (malformed, too large, corrupt): drop it from this delivery and
    alert; the rest of the outbox goes on."""


class PeerRefusedError(PeerRejectedError):
    """The peer refuses this data type from us (coordinator, skip_sync_receive, wrong
    cluster token): stop sending it until its configuration changes."""


class AuthError(RingsyncError):
    """A request carried no cluster token or a wrong one; it is refused."""


class BadInputError(RingsyncError):
    """Input from a peer or a file is malformed; it is rejected and nothing changes."""


class UnsafePathError(BadInputError):
    """A name from a peer would resolve outside the data dir."""


class TooLargeError(BadInputError):
    """Input exceeds a configured size bound."""


class ReceiveRefused(BadInputError):
    """This node does not take this data type at all (coordinator, skip_sync_receive)."""


class StorageFullError(RingsyncError):
    """The disk (or a quota) holding the data dir is full; nothing was written."""


class StorageBusyError(RingsyncError):
    """The receiver's storage cannot take a write now (locked, I/O error); retry later."""


class CorruptDataError(RingsyncError):
    """Stored or received data fails verification; it is quarantined or fetched again."""


def delivery_error(peer: str, exc: RingsyncError) -> TransportError:
    """What a sender does about a receiver's error: the one place that decides it.

    Every transport raises the result, the in-memory one directly and HTTP through its
    status codes (``ringsync.transport.http.wire``), so a sender behaves the same
    whichever carried the batch.
    """
    reason = str(exc)
    if isinstance(exc, ReceiveRefused | AuthError):
        return PeerRefusedError(peer, reason)
    if isinstance(exc, BadInputError | CorruptDataError):
        return BatchRejectedError(peer, reason)
    if isinstance(exc, StorageFullError | StorageBusyError):
        return TransientError(peer, reason)
    if isinstance(exc, TransportError):
        return exc
    return TransientError(peer, f"{type(exc).__name__}: {reason}")


class RestartBudgetExhausted(RingsyncError):
    """A daemon crashed more often than its restart budget allows; the process exits."""

    def __init__(self, daemon: str, restarts: int, window_s: float) -> None:
        super().__init__(
            f"daemon {daemon} crashed {restarts} times within {window_s:.0f}s; "
            "giving up so that systemd can restart the process"
        )
        self.daemon = daemon
        self.restarts = restarts

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
    """Moving bytes to or from a peer failed; the caller retries later."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerRejectedError(TransportError):
    """The peer answered but refused the request (4xx); retrying as-is won't help."""

    def __init__(self, peer: str, status: int, reason: str) -> None:
        super().__init__(peer, f"HTTP {status}: {reason}")
        self.status = status


class AuthError(RingsyncError):
    """A request carried no cluster token or a wrong one; it is refused."""


class BadInputError(RingsyncError):
    """Input from a peer or a file is malformed; it is rejected and nothing changes."""


class UnsafePathError(BadInputError):
    """A name from a peer would resolve outside the data dir."""


class TooLargeError(BadInputError):
    """Input exceeds a configured size bound."""


class StorageFullError(RingsyncError):
    """The disk (or a quota) holding the data dir is full; nothing was written."""


class StorageBusyError(RingsyncError):
    """The receiver's storage cannot take a write now (locked, I/O error); retry later."""


class CorruptDataError(RingsyncError):
    """Stored or received data fails verification; it is quarantined or fetched again."""


class RestartBudgetExhausted(RingsyncError):
    """A daemon crashed more often than its restart budget allows; the process exits."""

    def __init__(self, daemon: str, restarts: int, window_s: float) -> None:
        super().__init__(
            f"daemon {daemon} crashed {restarts} times within {window_s:.0f}s; "
            "giving up so that systemd can restart the process"
        )
        self.daemon = daemon
        self.restarts = restarts

"""The HTTP peer protocol's wire names, and its status codes mapped to typed errors.

The one place a status code means something: the server answers a receiver's error
with ``status_for``, the client turns a status back into the typed error a sender acts
on with ``error_for_status``; no other layer sees a status code.
"""

from __future__ import annotations

from ringsync.errors import (
    AuthError,
    BadInputError,
    BatchRejectedError,
    CorruptDataError,
    PeerRefusedError,
    PeerRejectedError,
    ReceiveRefused,
    RingsyncError,
    StorageBusyError,
    StorageFullError,
    TransientError,
    TransportError,
    delivery_error,
)

GAMES_PATH = "/v1/games"
STORAGE_PATH = "/v1/storage"
DIGEST_HEADER = "X-Ringsync-Digest"
DATA_DIR_HEADER = "X-Ringsync-Data-Dir-Id"
BATCH_CONTENT_TYPE = "application/vnd.ringsync.games+msgpack"
# A peer's answer is small JSON (an ack lists at most a batch's refused ids): a larger one
# is refused unread rather than held in memory, whatever the peer sends.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# Seconds a busy receiver asks a sender to wait (Retry-After).
RETRY_AFTER_SECONDS = 5

# A body over the receiver's RINGRIFT_MAX_BATCH_BYTES, refused unread (a bound that the
# decoded content exceeds is a BadInputError like any other: 400).
BODY_TOO_LARGE = 413

# A receiver's error and the status it is answered with, most specific class first; read
# in both directions. What the sender then does is ``delivery_error``'s decision.
_STATUS_OF_ERROR: tuple[tuple[type[RingsyncError], int], ...] = (
    (ReceiveRefused, 403),
    (AuthError, 401),
    (StorageFullError, 507),
    (StorageBusyError, 503),
    (CorruptDataError, 400),
    (BadInputError, 400),
)


def status_for(exc: RingsyncError) -> int:
    """The status a receiver answers ``exc`` with (500 for an error it did not expect)."""
    for cls, status in _STATUS_OF_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_for_status(peer: str, status: int, reason: str) -> TransportError:
    """The typed error a sender acts on, for a peer's non-200 answer."""
    text = f"HTTP {status}: {reason}"
    for cls, known in _STATUS_OF_ERROR:
        if known == status:
            return delivery_error(peer, cls(text))
    if status == BODY_TOO_LARGE:
        return BatchRejectedError(peer, text)
    if status in (408, 429) or status >= 500:  # the peer stalled, was busy or broke: later
        return TransientError(peer, text)
    if status == 404:  # a peer that does not serve this route does not take this data type
        return PeerRefusedError(peer, text)
    return PeerRejectedError(peer, text)

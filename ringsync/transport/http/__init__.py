"""The HTTP transport: client, server and the wire names and statuses they share."""

from ringsync.ops.peer_session import NODE_HEADER
from ringsync.transport.http.client import HttpTransport
from ringsync.transport.http.wire import (
    BATCH_CONTENT_TYPE,
    DATA_DIR_HEADER,
    DIGEST_HEADER,
    GAMES_PATH,
    MAX_ANSWER_BYTES,
    STORAGE_PATH,
)

__all__ = [
    "BATCH_CONTENT_TYPE",
    "DATA_DIR_HEADER",
    "DIGEST_HEADER",
    "GAMES_PATH",
    "MAX_ANSWER_BYTES",
    "NODE_HEADER",
    "STORAGE_PATH",
    "HttpTransport",
]

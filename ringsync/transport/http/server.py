"""The HTTP transport's server: /healthz, /metrics and the authenticated /v1/ peer API.

It answers a receiver's errors with the statuses ``wire`` maps them to; the daemon that
runs it is ``ringsync.daemons.data_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ringsync.errors import (
    BadInputError,
    ConfigError,
    CorruptDataError,
    ReceiveRefused,
    RingsyncError,
    StorageBusyError,
    StorageFullError,
    UnsafePathError,
)
from ringsync.files.server import add_file_routes
from ringsync.health import HealthState
from ringsync.node import NodeContext, circuits_status
from ringsync.ops.logsafe import bounded, quoted
from ringsync.ops.peer_session import NODE_HEADER
from ringsync.protocol.results import MergeResult
from ringsync.store.received_configs import TooManyConfigsError
from ringsync.transport.http.guard import PeerNoise
from ringsync.transport.http.wire import (
    BODY_TOO_LARGE,
    DATA_DIR_HEADER,
    DIGEST_HEADER,
    GAMES_PATH,
    RETRY_AFTER_SECONDS,
    STORAGE_PATH,
    status_for,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CTX: web.AppKey[NodeContext] = web.AppKey("ctx", NodeContext)
_NOISE: web.AppKey[PeerNoise] = web.AppKey("noise", PeerNoise)
LISTEN_BACKLOG = 512


@dataclass
class _Uploads:
    """Batch uploads held now, bounded in bytes, and the merges running.

    An upload reserves its size before a byte of its body is read and keeps it until
    its merge ends, so concurrent uploads (honest or not) never hold more than
    ``budget`` bytes of bodies. When the last merge ends, freed batch memory goes back
    to the OS.
    """

    budget: int
    merge_slots: asyncio.Semaphore
    held: int = 0
    merges: int = 0

    def reserve(self, nbytes: int) -> bool:
        if self.held + nbytes > self.budget:
            return False
        self.held += nbytes
        return True


class _UploadDropped(Exception):
    """The body of an upload could not be read: the peer stalled, went away or broke
    the framing. Internal to this module: answered by _within_upload_budget."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


_UPLOADS: web.AppKey[_Uploads] = web.AppKey("uploads", _Uploads)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    """Why the data server cannot listen on host:port, said as the setting to change."""
    where = f"address {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"RINGRIFT_P2P_PORT={port}: {where} is already in use (another "
                           "ringsync or process holds it); stop it or choose another port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"RINGRIFT_P2P_HOST={host}: {where} is not an address of this "
                           "machine; use one of its addresses or 0.0.0.0")
    if exc.errno == errno.EACCES:
        return ConfigError(f"RINGRIFT_P2P_PORT={port}: binding {where} is not permitted (ports "
                           "below 1024 need privileges); choose a port from 1024 up")
    return ConfigError(f"RINGRIFT_P2P_HOST={host}, RINGRIFT_P2P_PORT={port}: cannot listen on "
                       f"{where} ({exc.strerror or exc})")


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError unless the data server can bind host:port now.

    Checked before the daemons start so that a held port ends the process with one
    line and exit 2 instead of crashing the data server into its restart budget.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"RINGRIFT_P2P_HOST={host}: cannot resolve it ({exc.strerror}); use "
                          "an address of this machine") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # The options asyncio's create_server sets, so the probe fails exactly when it would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise bind_error(host, port, exc) from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[_CTX]
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        ctx.metrics.http_requests.labels(route=name, code=str(exc.status)).inc()
        raise
    except Exception:
        # aiohttp answers any other exception with a 500: count it as one.
        ctx.metrics.http_requests.labels(route=name, code="500").inc()
        raise
    ctx.metrics.http_requests.labels(route=name, code=str(response.status)).inc()
    return response


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1/ request carries the cluster token, compared in constant time."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    ctx = request.app[_CTX]
    token = ctx.settings.auth_token
    if token is None:
        # No token: the server is bound to loopback only (settings enforce it).
        return await handler(request)
    # A header's bytes that are not UTF-8 arrive as surrogate escapes: compare the bytes
    # (surrogatepass never raises), so a garbage header is a 401, not a 500.
    offered = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
    expected = f"Bearer {token}".encode()
    if not hmac.compare_digest(offered, expected):
        ctx.metrics.auth_failures.inc()
        return web.json_response(
            {"error": "missing or wrong cluster token: send 'Authorization: Bearer <token>' "
             "with the cluster's RINGRIFT_CLUSTER_AUTH_TOKEN"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="ringsync"'},
        )
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[_CTX]
    states = {t.value: h.state.value for t, h in ctx.daemon_health().items()}
    failing = any(s == HealthState.FAILED.value for s in states.values())
    return web.json_response(
        {"status": "failing" if failing else "ok", "daemons": states}, status=503 if failing else 200
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[_CTX].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def node_status(ctx: NodeContext, held: dict[str, int]) -> dict[str, Any]:
    """This node's view of itself: daemons, routing, outbox, games held."""
    host = ctx.host
    return {
        "node": ctx.settings.node_id,
        "role": host.role if host else "unknown",
        "time": time.time(),
        "daemons": {t.value: {"state": h.state.value, "detail": h.detail}
                    for t, h in ctx.daemon_health().items()},
        "routing": ctx.router.get_sync_status(),
        "manifest": ctx.manifest.summary(),
        "received_games": held,
        "received_total": sum(held.values()),
        "storage": ctx.shared.status(time.monotonic()),
        "circuits": circuits_status(ctx.breakers),  # per (peer, transport), not closed
    }


async def status(request: web.Request) -> web.Response:
    ctx = request.app[_CTX]
    # As the receiver counted them: no merged DB is opened (a scan each, and a read-only
    # open leaves -wal/-shm behind); it lists the synced dir, so in a worker thread.
    held = await asyncio.to_thread(ctx.receiver.held_games)
    return web.json_response(node_status(ctx, held), dumps=lambda d: json.dumps(d, sort_keys=True))


async def storage(request: web.Request) -> web.Response:
    """This node's data dir identity: peers compare it with theirs (equal = shared storage)."""
    ctx = request.app[_CTX]
    return web.json_response({"node": ctx.settings.node_id, **ctx.shared.own.as_dict()})


# Longest error text a peer gets back (our message may quote parts of its input).
_ANSWER_CHARS = 1000


def _peer(request: web.Request) -> str:
    """Who sent a request, for logs: its X-Ringsync-Node (peer-chosen: quoted, bounded)
    and its address."""
    name = request.headers.get(NODE_HEADER)
    return f"{quoted(name, 80)} at {request.remote}" if name is not None else str(request.remote)


async def receive_games(request: web.Request) -> web.Response:
    ctx = request.app[_CTX]
    if request.headers.get(DATA_DIR_HEADER) == ctx.shared.own.data_dir_id:
        # The sender's games are in our data dir already, where training reads them:
        # a merged copy beside the original would only duplicate them. Body left unread.
        ctx.metrics.batches_received.labels(outcome="shared_storage").inc()
        return web.json_response({"shared_storage": True, **ctx.shared.own.as_dict()})
    limit = ctx.settings.max_batch_bytes
    digest = request.headers.get(DIGEST_HEADER)
    payload = await _read_body(request, limit)
    if payload is None:
        ctx.metrics.batches_received.labels(outcome="too_large").inc()
        size = request.content_length or f"more than {limit}"
        return _error(BODY_TOO_LARGE, f"batch of {size} bytes exceeds the {limit}-byte limit "
                           "(RINGRIFT_MAX_BATCH_BYTES on the receiver)")
    if not digest:
        return _error(400, f"missing {DIGEST_HEADER} header with the batch's content hash")
    started = time.perf_counter()
    try:
        result = await _merge(request.app, payload, digest)
    except _RECEIVER_ERRORS as exc:
        return _refusal(request, exc)
    ctx.metrics.merge_duration.observe(time.perf_counter() - started)
    ctx.metrics.batches_received.labels(outcome="merged").inc()
    ctx.metrics.bytes_received.inc(len(payload))
    ctx.memory.note(len(payload))
    ctx.metrics.games_received.inc(result.inserted)
    ctx.metrics.games_duplicate_received.inc(result.duplicates)
    return web.json_response({"inserted": result.inserted, "duplicates": result.duplicates,
                              "refused": list(result.refused)})


# The receiver's errors, most specific first, with the outcome each is counted as.
_OUTCOMES: tuple[tuple[type[RingsyncError], str], ...] = (
    (ReceiveRefused, "refused"),
    (StorageFullError, "storage_full"),
    (StorageBusyError, "storage_busy"),
    (TooManyConfigsError, "too_many_configs"),  # logged once by the receiver
    (UnsafePathError, "unsafe_path"),
    (BadInputError, "rejected"),
    (CorruptDataError, "rejected"),
)
_RECEIVER_ERRORS = tuple(cls for cls, _ in _OUTCOMES)


def _refusal(request: web.Request, exc: RingsyncError) -> web.Response:
    """Answer a batch the receiver did not merge with the status ``wire`` maps it to."""
    ctx = request.app[_CTX]
    outcome = next(name for cls, name in _OUTCOMES if isinstance(exc, cls))
    ctx.metrics.batches_received.labels(outcome=outcome).inc()
    if outcome == "storage_full":
        log.error("cannot merge a game batch: %s", bounded(str(exc)))
    elif outcome == "storage_busy":
        log.warning("cannot merge a game batch now: %s", bounded(str(exc)))
    elif outcome in ("unsafe_path", "rejected"):
        # Rate-limited: a peer sending bad batches in a loop must not flood the log.
        _noise(request).warnings.warning("rejected", "rejected a game batch from %s: %s",
                                         _peer(request), bounded(str(exc)))
    status = status_for(exc)
    headers = {"Retry-After": "10"} if status == 503 else None
    return web.json_response({"error": bounded(str(exc), _ANSWER_CHARS)}, status=status,
                             headers=headers)


def _within_upload_budget(handler: Handler) -> Handler:
    """Run ``handler`` only if the upload's size fits the budget of bodies held (else 503);
    answer an upload whose body stalls or is cut off without a traceback."""

    async def bounded(request: web.Request) -> web.StreamResponse:
        uploads = request.app[_UPLOADS]
        limit = request.app[_CTX].settings.max_batch_bytes
        declared = request.content_length
        size = limit if declared is None else min(declared, limit)  # larger: refused unread
        if not uploads.reserve(size):
            return _busy(request, uploads)
        request.app[_CTX].metrics.upload_bytes_in_flight.set(uploads.held)
        try:
            return await handler(request)
        except _UploadDropped as exc:
            return await _dropped(request, exc)
        finally:
            uploads.held -= size
            request.app[_CTX].metrics.upload_bytes_in_flight.set(uploads.held)

    return bounded


def _busy(request: web.Request, uploads: _Uploads) -> web.Response:
    ctx = request.app[_CTX]
    ctx.metrics.uploads_dropped.labels(reason="busy").inc()
    _noise(request).warnings.warning(
        "busy", "answered an upload from %s with 503: %d bytes of uploads held already "
        "(RINGRIFT_MAX_UPLOAD_BYTES_IN_FLIGHT=%d)", request.remote, uploads.held, uploads.budget)
    response = _error(503, "too many uploads in flight here; retry later")
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response.force_close()
    return response


async def _dropped(request: web.Request, exc: _UploadDropped) -> web.StreamResponse:
    request.app[_CTX].metrics.uploads_dropped.labels(reason=exc.reason).inc()
    _noise(request).warnings.warning(exc.reason, "dropped an upload from %s: %s",
                                     request.remote, exc)
    response = _error(exc.status, str(exc))
    response.force_close()
    transport = request.transport
    if transport is not None and not transport.is_closing():
        # Sent now, so that the connection can be closed without aiohttp's lingering
        # read of the rest of a body that stalled (up to 10 s more per connection).
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
    request.protocol.force_close()
    return response


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it is known to exceed ``limit`` bytes.

    Not ``request.read()``: aiohttp keeps that copy on the request, and a keep-alive
    connection keeps its last request until the next one arrives, so an idle node
    would hold its last batch (about 13 MB) per peer connection. Raises _UploadDropped
    when no byte arrives within the body timeout or the peer goes away mid-body.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    # Sized once when the length is known: growing a bytearray chunk by chunk copies it
    # (twice the memory for a moment), and untouched pages of a stalled upload stay unused.
    body = bytearray(request.content_length or 0)
    filled = 0
    try:
        while chunk := await _next_chunk(request):
            if filled + len(chunk) > limit:
                return None
            body[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
    except _UploadDropped:
        # Free the partial body now, whoever still holds this frame (a traceback in a
        # reference cycle lives until the cyclic GC runs: RSS 46 MB -> 3 GB over 80
        # aborted 60 MB uploads before).
        body.clear()
        raise
    del body[filled:]
    return bytes(body)


async def _next_chunk(request: web.Request) -> bytes:
    """The next chunk of the body (b"" at its end), or a typed _UploadDropped.

    aiohttp's exceptions stay stored on the request's payload: their traceback is
    cleared so that they do not keep the reading frames (and the body) alive.
    """
    timeout = request.app[_CTX].settings.http_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.content.readany()
    except TimeoutError as exc:
        exc.__traceback__ = None
        failure = _UploadDropped("stalled", 408, f"no body byte for {timeout:g} s "
                                 "(RINGRIFT_HTTP_BODY_TIMEOUT)")
    except ConnectionError as exc:
        exc.__traceback__ = None
        failure = _UploadDropped("aborted", 400, "the peer disconnected mid-body")
    except (HttpProcessingError, RequestPayloadError) as exc:
        exc.__traceback__ = None
        _noise(request).malformed(request.remote or "unknown", exc)
        failure = _UploadDropped("malformed", 400, "malformed body framing")
    try:
        raise failure
    finally:
        del failure  # no cycle: failure -> traceback -> this frame -> failure


def _noise(request: web.Request) -> PeerNoise:
    return request.app[_NOISE]


async def _merge(app: web.Application, payload: bytes, digest: str) -> MergeResult:
    uploads = app[_UPLOADS]
    async with uploads.merge_slots:
        uploads.merges += 1
        try:
            return await asyncio.to_thread(app[_CTX].receiver.receive, payload, digest)
        finally:
            uploads.merges -= 1
            if uploads.merges == 0:
                app[_CTX].memory.idle()


async def notify(request: web.Request) -> web.Response:
    """A local generator says 'I committed games': wake auto-sync now."""
    request.app[_CTX].sync_wakeup.set()
    return web.json_response({"ok": True})


def build_app(ctx: NodeContext, noise: PeerNoise | None = None) -> web.Application:
    app = web.Application(
        middlewares=[_count_requests, _authenticate],
        client_max_size=ctx.settings.max_batch_bytes,
    )
    app[_CTX] = ctx
    app[_NOISE] = noise or PeerNoise(ctx.metrics)
    app[_UPLOADS] = _Uploads(ctx.settings.upload_budget_bytes,
                             asyncio.Semaphore(ctx.settings.max_merges_in_flight))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get(STORAGE_PATH, storage)
    app.router.add_post(GAMES_PATH, _within_upload_budget(receive_games))
    app.router.add_post("/v1/notify", notify)
    add_file_routes(app, ctx.settings, ctx.bandwidth, ctx.metrics)
    return app

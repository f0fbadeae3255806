"""The data server daemon: /healthz, /metrics and the authenticated /v1/ peer API."""

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

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.http_guard import (
    ConnectionGuard,
    HandlerOptions,
    PeerNoise,
    connection_cap,
    handler_factory,
    raise_open_file_limit,
)
from ringsync.errors import (
    BadInputError,
    ConfigError,
    CorruptDataError,
    StorageBusyError,
    StorageFullError,
    UnsafePathError,
)
from ringsync.files.server import add_file_routes
from ringsync.node import NodeContext
from ringsync.ops.logsafe import bounded, quoted
from ringsync.store.received_configs import TooManyConfigsError
from ringsync.store.receiver import ReceiveRefused
from ringsync.transport.base import PushResult
from ringsync.transport.http import DATA_DIR_HEADER, DIGEST_HEADER, GAMES_PATH, STORAGE_PATH

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CTX: web.AppKey[NodeContext] = web.AppKey("ctx", NodeContext)
_NOISE: web.AppKey[PeerNoise] = web.AppKey("noise", PeerNoise)
LISTEN_BACKLOG = 512
RETRY_AFTER_SECONDS = 5


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
    name = request.headers.get("X-Ringsync-Node")
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
        return _error(413, f"batch of {size} bytes exceeds the {limit}-byte limit "
                           "(RINGRIFT_MAX_BATCH_BYTES on the receiver)")
    if not digest:
        return _error(400, f"missing {DIGEST_HEADER} header with the batch's content hash")
    started = time.perf_counter()
    try:
        result = await _merge(request.app, payload, digest)
    except ReceiveRefused as exc:
        ctx.metrics.batches_received.labels(outcome="refused").inc()
        return _error(403, str(exc))
    except StorageFullError as exc:
        ctx.metrics.batches_received.labels(outcome="storage_full").inc()
        log.error("cannot merge a game batch: %s", bounded(str(exc)))
        return _error(507, bounded(str(exc), _ANSWER_CHARS))
    except StorageBusyError as exc:
        ctx.metrics.batches_received.labels(outcome="storage_busy").inc()
        log.warning("cannot merge a game batch now: %s", bounded(str(exc)))
        return web.json_response({"error": bounded(str(exc), _ANSWER_CHARS)}, status=503,
                                 headers={"Retry-After": "10"})
    except TooManyConfigsError as exc:  # logged once by the receiver, counted every time
        ctx.metrics.batches_received.labels(outcome="too_many_configs").inc()
        return _error(400, bounded(str(exc), _ANSWER_CHARS))
    except (BadInputError, CorruptDataError) as exc:
        outcome = "unsafe_path" if isinstance(exc, UnsafePathError) else "rejected"
        ctx.metrics.batches_received.labels(outcome=outcome).inc()
        # Rate-limited: a peer sending bad batches in a loop must not flood the log.
        _noise(request).warnings.warning("rejected", "rejected a game batch from %s: %s",
                                         _peer(request), bounded(str(exc)))
        return _error(400, bounded(str(exc), _ANSWER_CHARS))
    ctx.metrics.merge_duration.observe(time.perf_counter() - started)
    ctx.metrics.batches_received.labels(outcome="merged").inc()
    ctx.metrics.bytes_received.inc(len(payload))
    ctx.memory.note(len(payload))
    ctx.metrics.games_received.inc(result.inserted)
    ctx.metrics.games_duplicate_received.inc(result.duplicates)
    return web.json_response({"inserted": result.inserted, "duplicates": result.duplicates,
                              "refused": list(result.refused)})


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


async def _merge(app: web.Application, payload: bytes, digest: str) -> PushResult:
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
    add_file_routes(app, ctx.settings)
    return app


class DataServerDaemon(Daemon):
    """Serves peers and operators on RINGRIFT_P2P_HOST:RINGRIFT_P2P_PORT."""

    daemon_type = DaemonType.DATA_SERVER

    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._health = Health(HealthState.STARTING)

    async def run(self, ready: Callable[[], None]) -> None:
        s = self._ctx.settings
        guard = ConnectionGuard(connection_cap(s.http_max_connections, raise_open_file_limit()),
                                s.http_max_connections_per_address)
        noise = PeerNoise(self._ctx.metrics)
        runner = web.AppRunner(build_app(self._ctx, noise), access_log=None,
                               shutdown_timeout=s.drain_timeout, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            assert runner.server is not None
            options = HandlerOptions(guard, noise, s.http_header_timeout, s.http_idle_timeout)
            # Our own listener instead of web.TCPSite: each connection gets the guarded
            # handler (admission, header deadline), which TCPSite cannot be told to use.
            factory = handler_factory(runner.server, options, access_log=None)
            try:
                self._listener = await asyncio.get_running_loop().create_server(
                    factory, s.p2p_host, s.p2p_port, reuse_address=True, backlog=LISTEN_BACKLOG)
            except OSError as exc:
                raise bind_error(s.p2p_host, s.p2p_port, exc) from None
            self._log_binding()
            log.info("serving at most %d connections, %d per address", guard.max_total,
                     guard.max_per_address)
            self._health = Health(HealthState.HEALTHY, f"listening on {s.p2p_host}:{s.p2p_port}")
            ready()
            await asyncio.Event().wait()
        finally:
            self._health = Health(HealthState.STOPPED)
            await asyncio.shield(self._close())

    def _log_binding(self) -> None:
        s = self._ctx.settings
        if s.auth_token is None:
            log.warning("no cluster token configured (RINGRIFT_CLUSTER_AUTH_TOKEN): peer endpoints "
                        "listen on loopback only, at %s:%d", s.p2p_host, s.p2p_port)
        else:
            log.info("data server listening on %s:%d", s.p2p_host, s.p2p_port)

    async def drain(self) -> None:
        # Stop accepting; handlers already running (merges) finish within shutdown_timeout.
        await self._close()

    async def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # stop accepting; open connections drain in runner.cleanup()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def health(self) -> Health:
        return self._health

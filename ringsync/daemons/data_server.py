"""The data server daemon: /healthz, /metrics and the authenticated /v1/ peer API."""

from __future__ import annotations

import asyncio
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

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.errors import (
    BadInputError,
    ConfigError,
    CorruptDataError,
    StorageBusyError,
    StorageFullError,
    UnsafePathError,
)
from ringsync.node import NodeContext
from ringsync.ops.logsafe import bounded, quoted
from ringsync.store.received_configs import TooManyConfigsError
from ringsync.store.receiver import ReceiveRefused
from ringsync.transport.base import PushResult
from ringsync.transport.http import DATA_DIR_HEADER, DIGEST_HEADER, GAMES_PATH, STORAGE_PATH

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CTX: web.AppKey[NodeContext] = web.AppKey("ctx", NodeContext)


@dataclass
class _InFlight:
    """Merges running now; when the last one ends, freed batch memory goes back to the OS."""

    merges: int = 0


_INFLIGHT: web.AppKey[_InFlight] = web.AppKey("inflight", _InFlight)


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
    offered = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(offered.encode(), expected.encode()):
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


def held_games(ctx: NodeContext) -> dict[str, int]:
    """Games merged here, per config DB, as the receiver counted them: no merged DB is
    opened (a scan each, and a read-only open leaves -wal/-shm files behind). Lists the
    synced dir: run it in a worker thread."""
    return ctx.receiver.held_games()


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
    held = await asyncio.to_thread(held_games, ctx)
    return web.json_response(node_status(ctx, held), dumps=lambda d: json.dumps(d, sort_keys=True))


async def storage(request: web.Request) -> web.Response:
    """This node's data dir identity: peers compare it with theirs (equal = shared storage)."""
    ctx = request.app[_CTX]
    return web.json_response({"node": ctx.settings.node_id, **ctx.shared.own.as_dict()})


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
        log.warning("rejected a game batch from %s: %s", _peer(request), bounded(str(exc)))
        return _error(400, bounded(str(exc), _ANSWER_CHARS))
    ctx.metrics.merge_duration.observe(time.perf_counter() - started)
    ctx.metrics.batches_received.labels(outcome="merged").inc()
    ctx.metrics.bytes_received.inc(len(payload))
    ctx.memory.note(len(payload))
    ctx.metrics.games_received.inc(result.inserted)
    ctx.metrics.games_duplicate_received.inc(result.duplicates)
    return web.json_response({"inserted": result.inserted, "duplicates": result.duplicates,
                              "refused": list(result.refused)})


# Longest error text a peer gets back (our message may quote parts of its input).
_ANSWER_CHARS = 1000


def _peer(request: web.Request) -> str:
    """Who sent a request, for logs: its X-Ringsync-Node (peer-chosen: quoted, bounded)
    and its address."""
    name = request.headers.get("X-Ringsync-Node")
    return f"{quoted(name, 80)} at {request.remote}" if name is not None else str(request.remote)


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it is known to exceed ``limit`` bytes.

    Not ``request.read()``: aiohttp keeps that copy on the request, and a keep-alive
    connection keeps its last request until the next one arrives, so an idle node
    would hold its last batch (about 13 MB) per peer connection.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _merge(app: web.Application, payload: bytes, digest: str) -> PushResult:
    inflight = app[_INFLIGHT]
    inflight.merges += 1
    try:
        return await asyncio.to_thread(app[_CTX].receiver.receive, payload, digest)
    finally:
        inflight.merges -= 1
        if inflight.merges == 0:
            app[_CTX].memory.idle()


async def notify(request: web.Request) -> web.Response:
    """A local generator says 'I committed games': wake auto-sync now."""
    request.app[_CTX].sync_wakeup.set()
    return web.json_response({"ok": True})


def build_app(ctx: NodeContext) -> web.Application:
    app = web.Application(
        middlewares=[_count_requests, _authenticate],
        client_max_size=ctx.settings.max_batch_bytes,
    )
    app[_CTX] = ctx
    app[_INFLIGHT] = _InFlight()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get(STORAGE_PATH, storage)
    app.router.add_post(GAMES_PATH, receive_games)
    app.router.add_post("/v1/notify", notify)
    return app


class DataServerDaemon(Daemon):
    """Serves peers and operators on RINGRIFT_P2P_HOST:RINGRIFT_P2P_PORT."""

    daemon_type = DaemonType.DATA_SERVER

    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._runner: web.AppRunner | None = None
        self._health = Health(HealthState.STARTING)

    async def run(self, ready: Callable[[], None]) -> None:
        s = self._ctx.settings
        runner = web.AppRunner(build_app(self._ctx), access_log=None,
                               shutdown_timeout=s.drain_timeout, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            try:
                await web.TCPSite(runner, s.p2p_host, s.p2p_port, reuse_address=True).start()
            except OSError as exc:
                raise bind_error(s.p2p_host, s.p2p_port, exc) from None
            self._log_binding()
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
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def health(self) -> Health:
        return self._health

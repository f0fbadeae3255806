"""A hostile or broken receiver, seen from the sender's HTTP transport (a real aiohttp server).

Its answers are peer-controlled bytes: an error text may carry newlines meant to forge
our log lines, and an answer may be arbitrarily long. The transport must turn both into a
typed error with a one-line, bounded message, without holding the whole answer in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from ringsync.errors import PeerRejectedError, TransportError
from ringsync.inventory import Host
from ringsync.transport.http import GAMES_PATH, MAX_ANSWER_BYTES, HttpTransport

FORGED = "2026-11-30 06:00:00,000 ERROR ringsync.fake: FORGED LINE"


async def _forging(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=400, text=f"bad batch\n{FORGED}\r\n" + "x" * 5000)


async def _flooding(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(status=200)
    await response.prepare(request)
    chunk = b"[" * (1024 * 1024)
    for _ in range(MAX_ANSWER_BYTES // len(chunk) + 8):  # never ends before the limit
        await response.write(chunk)
    await response.write_eof()
    return response


@pytest.fixture
async def peer(unused_tcp_port: int) -> AsyncIterator[Host]:
    app = web.Application()
    app.router.add_post(GAMES_PATH, _forging)
    app.router.add_post("/flood" + GAMES_PATH, _flooding)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        yield Host("train-1", p2p_host="127.0.0.1", p2p_port=unused_tcp_port)
    finally:
        await runner.cleanup()


async def test_a_receivers_error_text_cannot_forge_or_flood_our_log_lines(peer: Host) -> None:
    transport = HttpTransport("selfplay-1", "token")
    try:
        with pytest.raises(PeerRejectedError) as caught:
            await transport.push_games(peer, b"payload", "xxh3-128:00")
    finally:
        await transport.close()
    message = str(caught.value)
    assert "\n" not in message
    assert "\r" not in message
    assert "bad batch" in message
    assert len(message) < 1000


async def test_an_endless_answer_is_refused_at_the_limit(peer: Host,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    transport = HttpTransport("selfplay-1", "token")
    monkeypatch.setattr("ringsync.transport.http.client.GAMES_PATH", "/flood" + GAMES_PATH)
    try:
        with pytest.raises(TransportError, match="answer longer than"):
            await transport.push_games(peer, b"payload", "xxh3-128:00")
    finally:
        await transport.close()

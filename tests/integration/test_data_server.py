"""The real aiohttp data server: authentication, bounds, bad input, merge, metrics."""

from __future__ import annotations

import io
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from ringsync.node import NodeContext
from ringsync.protocol.batch import GameBatch, content_digest, encode_batch
from ringsync.store.gamedb import count_games
from ringsync.transport.http import BATCH_CONTENT_TYPE, DIGEST_HEADER, GAMES_PATH
from tests.conftest import TOKEN, extract_batches, write_games


def url(ctx: NodeContext, path: str) -> str:
    return f"http://127.0.0.1:{ctx.settings.p2p_port}{path}"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post_batch(ctx: NodeContext, payload: bytes, *, digest: str | None = None,
                     headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    hdrs = {**auth(), DIGEST_HEADER: digest or content_digest(payload),
            "Content-Type": BATCH_CONTENT_TYPE, **(headers or {})}
    hdrs["Content-Length"] = str(len(payload))
    async with aiohttp.ClientSession() as s, s.post(url(ctx, GAMES_PATH), data=io.BytesIO(payload),
                                                    headers=hdrs) as r:
        return r.status, await r.json(content_type=None)


def synced_files(ctx: NodeContext) -> list[Path]:
    return sorted(p for p in ctx.settings.data_dir.rglob("*") if p.is_file() and ".ringsync" not in p.parts)


@pytest.fixture
def batch(tmp_path: Path) -> GameBatch:
    write_games(tmp_path / "src" / "selfplay.db", 5)
    (only,) = extract_batches(tmp_path / "src" / "selfplay.db")
    return only


async def test_healthz_is_open_and_v1_needs_the_token(node_factory: Callable[..., NodeContext],
                                                      served: Callable[..., Any]) -> None:
    ctx = node_factory()
    await served(ctx)
    async with aiohttp.ClientSession() as s:
        async with s.get(url(ctx, "/healthz")) as r:
            assert r.status == 200
        for headers in ({}, auth("wrong-token-wrong-token"), {"Authorization": TOKEN}):
            async with s.get(url(ctx, "/v1/status"), headers=headers) as r:
                assert r.status == 401
                body = await r.text()
                assert TOKEN not in body
        async with s.get(url(ctx, "/v1/status"), headers=auth()) as r:
            assert r.status == 200
            assert (await r.json())["node"] == "train-1"
    assert ctx.metrics.auth_failures._value.get() == 3


async def test_valid_batch_is_merged_once(node_factory: Callable[..., NodeContext],
                                          served: Callable[..., Any], batch: GameBatch) -> None:
    ctx = node_factory()
    await served(ctx)
    payload = encode_batch(batch)
    assert await post_batch(ctx, payload) == (200, {"inserted": 5, "duplicates": 0, "refused": []})
    assert await post_batch(ctx, payload) == (200, {"inserted": 0, "duplicates": 5, "refused": []})
    assert count_games(ctx.settings.synced_dir / f"{batch.config_key}.db") == 5


async def test_wrong_token_changes_nothing(node_factory: Callable[..., NodeContext],
                                           served: Callable[..., Any], batch: GameBatch) -> None:
    ctx = node_factory()
    await served(ctx)
    status, _ = await post_batch(ctx, encode_batch(batch), headers=auth("not-the-cluster-token!"))
    assert status == 401
    assert synced_files(ctx) == []


async def test_oversize_body_is_413(node_factory: Callable[..., NodeContext],
                                    served: Callable[..., Any]) -> None:
    ctx = node_factory()
    await served(ctx)
    status, body = await post_batch(ctx, b"\0" * (ctx.settings.max_batch_bytes + 1))
    assert status == 413
    assert "RINGRIFT_MAX_BATCH_BYTES" in body["error"]
    assert synced_files(ctx) == []


async def test_chunked_oversize_body_is_413(node_factory: Callable[..., NodeContext],
                                            served: Callable[..., Any]) -> None:
    ctx = node_factory()
    await served(ctx)
    size = ctx.settings.max_batch_bytes + 1

    async def chunks() -> Any:  # no Content-Length: the bound must hold while reading
        for _ in range(size // 65536 + 1):
            yield b"\0" * 65536

    async with aiohttp.ClientSession() as s, s.post(
        url(ctx, GAMES_PATH), data=chunks(), headers={**auth(), DIGEST_HEADER: "xxh3-128:0"}
    ) as r:
        assert r.status == 413
    assert synced_files(ctx) == []


@pytest.mark.parametrize("config_key", ["../../escape", "..", "a/b", "/etc/passwd", "x\0y"])
async def test_name_escaping_the_data_dir_is_400(node_factory: Callable[..., NodeContext],
                                                 served: Callable[..., Any], batch: GameBatch,
                                                 config_key: str, tmp_path: Path) -> None:
    ctx = node_factory()
    await served(ctx)
    raw = msgpack.unpackb(encode_batch(batch), raw=False)
    raw["config_key"] = config_key
    status, body = await post_batch(ctx, msgpack.packb(raw, use_bin_type=True))
    assert status == 400, body
    assert synced_files(ctx) == []
    assert not list(tmp_path.rglob("escape*"))


def _tampered_image(raw: dict[str, Any]) -> bytes:
    """A valid SQLite image that smuggles in a trigger the header does not declare."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.deserialize(raw["image"])
        conn.execute("CREATE TRIGGER t AFTER INSERT ON games BEGIN DELETE FROM games; END")
        return msgpack.packb({**raw, "image": conn.serialize()}, use_bin_type=True)


@pytest.mark.parametrize("mutate", [
    lambda raw: b"\x93not msgpack at all",
    lambda raw: msgpack.packb({**raw, "v": 99}, use_bin_type=True),
    lambda raw: msgpack.packb({k: v for k, v in raw.items() if k != "tables"}, use_bin_type=True),
    lambda raw: msgpack.packb({**raw, "game_ids": ["someone-else"]}, use_bin_type=True),
    lambda raw: msgpack.packb({**raw, "tables": [*raw["tables"][:1], {"name": "sqlite_master",
                                                                       "columns": []}]},
                              use_bin_type=True),
    lambda raw: msgpack.packb({**raw, "image": raw["image"][:4096]}, use_bin_type=True),
    _tampered_image,
], ids=["garbage", "version", "no tables", "foreign game_ids", "sqlite_master table",
        "truncated image", "image with a trigger"])
async def test_malformed_batch_is_400_and_merges_nothing(node_factory: Callable[..., NodeContext],
                                                         served: Callable[..., Any], batch: GameBatch,
                                                         mutate: Callable[[dict[str, Any]], bytes]) -> None:
    ctx = node_factory()
    await served(ctx)
    raw = msgpack.unpackb(encode_batch(batch), raw=False)
    status, body = await post_batch(ctx, mutate(raw))
    assert status == 400, body
    assert body["error"]
    assert synced_files(ctx) == []


async def test_content_hash_mismatch_is_rejected(node_factory: Callable[..., NodeContext],
                                                 served: Callable[..., Any], batch: GameBatch) -> None:
    ctx = node_factory()
    await served(ctx)
    payload = encode_batch(batch)
    status, body = await post_batch(ctx, payload, digest=content_digest(payload + b"x"))
    assert status == 400
    assert "hash mismatch" in body["error"]
    assert synced_files(ctx) == []


async def test_coordinator_refuses_games(node_factory: Callable[..., NodeContext],
                                         served: Callable[..., Any], batch: GameBatch) -> None:
    ctx = node_factory("coordinator")
    await served(ctx)
    status, body = await post_batch(ctx, encode_batch(batch))
    assert status == 403
    assert "coordinator" in body["error"]
    assert synced_files(ctx) == []


async def test_metrics_pass_promtool(node_factory: Callable[..., NodeContext],
                                     served: Callable[..., Any], batch: GameBatch) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); .ci/run installs it")
    ctx = node_factory()
    await served(ctx)
    await post_batch(ctx, encode_batch(batch))
    async with aiohttp.ClientSession() as s, s.get(url(ctx, "/metrics")) as r:
        assert r.status == 200
        text = await r.read()
    assert b"ringsync_games_received_total 5.0" in text
    assert TOKEN.encode() not in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Mount a 1 MiB tmpfs over a directory: a real full disk, undone at teardown."""
    mounted: list[Path] = []

    def mount(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_is_507_with_a_clear_message_and_merges_nothing(
    node_factory: Callable[..., NodeContext], served: Callable[..., Any], tmp_path: Path,
    tiny_filesystem: Callable[[Path], None],
) -> None:
    ctx = node_factory(max_batch_bytes=64 * 1024 * 1024)
    tiny_filesystem(ctx.settings.synced_dir)
    await served(ctx)
    write_games(tmp_path / "src" / "big.db", 300)
    (big,) = extract_batches(tmp_path / "src" / "big.db")
    status, body = await post_batch(ctx, encode_batch(big))
    assert status == 507
    assert "full" in body["error"]
    assert str(ctx.settings.synced_dir) in body["error"]
    target = ctx.settings.synced_dir / f"{big.config_key}.db"
    assert not target.exists() or count_games(target) == 0
    assert ctx.metrics.batches_received.labels(outcome="storage_full")._value.get() == 1

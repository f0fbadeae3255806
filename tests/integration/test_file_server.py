"""The data server's /v1/files routes, over real HTTP: token, names, ranges, changed files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.layout import file_dirs, manifest_path
from ringsync.files.manifest import FileManifest
from ringsync.files.scanner import FileScanner
from ringsync.node import NodeContext
from tests.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def url(ctx: NodeContext, path: str) -> str:
    return f"http://127.0.0.1:{ctx.settings.p2p_port}{path}"


def offer(ctx: NodeContext, files: dict[str, bytes]) -> Path:
    """Write finished files into the node's models dir and record them as its scanner does."""
    models = ctx.settings.models_dir
    for relpath, data in files.items():
        (models / relpath).parent.mkdir(parents=True, exist_ok=True)
        (models / relpath).write_bytes(data)
        os.utime(models / relpath, (1, 1))  # written long ago: settled
    (models / "ringrift_best_x.pth").symlink_to("canonical_x.pth")
    manifest = FileManifest(manifest_path(ctx.settings))
    try:
        FileScanner(file_dirs(ctx.settings), manifest, 5.0).scan()
    finally:
        manifest.close()
    return models


async def get(ctx: NodeContext, path: str, headers: dict[str, str] | None = None,
              ) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as s, s.get(url(ctx, path), headers=headers) as r:
        return r.status, await r.read(), r.headers


@pytest.fixture
async def node(node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> NodeContext:
    ctx = node_factory()
    offer(ctx, {"canonical_x.pth": b"0123456789" * 1000, "production/x/m_1.pth": b"m"})
    (ctx.settings.data_dir / "secret.pth").write_bytes(b"outside the models dir")
    await served(ctx)
    return ctx


async def test_the_index_lists_what_is_held_and_needs_the_token(node: NodeContext) -> None:
    status, _, _ = await get(node, "/v1/files/index")
    assert status == 401
    status, body, _ = await get(node, "/v1/files/index", AUTH)
    assert status == 200
    files = {f["relpath"]: f for f in json.loads(body)["files"]}
    assert set(files) == {"canonical_x.pth", "production/x/m_1.pth", "ringrift_best_x.pth"}
    assert files["ringrift_best_x.pth"]["link_target"] == "canonical_x.pth"
    assert files["canonical_x.pth"]["hash"] == hash_file(node.settings.models_dir / "canonical_x.pth")
    assert files["canonical_x.pth"]["kind"] == FileKind.MODELS.value


async def test_a_file_is_served_whole_or_from_an_offset_with_its_hash(node: NodeContext) -> None:
    data = b"0123456789" * 1000
    status, body, headers = await get(node, "/v1/files/models/canonical_x.pth", AUTH)
    assert (status, body) == (200, data)
    assert headers["X-Ringsync-Content-Hash"] == hash_file(node.settings.models_dir / "canonical_x.pth")
    status, body, headers = await get(node, "/v1/files/models/canonical_x.pth",
                                      {**AUTH, "Range": "bytes=9990-"})
    assert (status, body) == (206, data[9990:])
    assert headers["Content-Range"] == "bytes 9990-9999/10000"
    status, _, headers = await get(node, "/v1/files/models/canonical_x.pth",
                                   {**AUTH, "Range": "bytes=10000-"})
    assert status == 416
    assert headers["Content-Range"] == "bytes */10000"
    status, body, _ = await get(node, "/v1/files/models/production/x/m_1.pth", AUTH)
    assert (status, body) == (200, b"m")


@pytest.mark.parametrize(("path", "statuses"), [
    ("/v1/files/models/..%2Fsecret.pth", {400, 404}),
    ("/v1/files/models/%2E%2E/secret.pth", {400, 404}),
    ("/v1/files/models/../secret.pth", {400, 404}),
    ("/v1/files/models/.canonical_x.pth.ringsync-part", {400}),
    ("/v1/files/models/%2Fetc%2Fpasswd", {400, 404}),
    ("/v1/files/games/canonical_x.pth", {404}),
    ("/v1/files/training_data/canonical_x.pth", {404}),
    ("/v1/files/models/ringrift_best_x.pth", {404}),  # a symlink: listed, never followed
    ("/v1/files/models/unknown.pth", {404}),
])
async def test_names_outside_what_is_held_are_refused(node: NodeContext, path: str,
                                                      statuses: set[int]) -> None:
    status, body, _ = await get(node, path, AUTH)
    assert status in statuses
    assert b"outside the models dir" not in body


async def test_a_file_rewritten_in_place_is_withheld_until_hashed_again(node: NodeContext) -> None:
    model = node.settings.models_dir / "canonical_x.pth"
    with model.open("r+b") as f:
        f.write(b"new")
    status, body, _ = await get(node, "/v1/files/models/canonical_x.pth", AUTH)
    assert status == 409
    assert b"changed since it was hashed" in body
    _, index, _ = await get(node, "/v1/files/index", AUTH)
    listed = {f["relpath"] for f in json.loads(index)["files"]}
    assert listed == {"production/x/m_1.pth", "ringrift_best_x.pth"}

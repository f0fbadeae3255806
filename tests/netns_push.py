"""Drive SshTransport from inside a lab host: `ip netns exec NS python -m tests.netns_push SPEC`.

The test process lives in the root namespace and cannot reach the lab's addresses, so a
push that must cross the lab's links runs here. SPEC is JSON: ``peer`` (Host fields),
``known_hosts``, ``token``, ``keepalive_interval``, ``keepalive_count_max`` and
``steps``, each ``{"push_random": BYTES}``, ``{"push_db": PATH}`` or ``"wait"`` (read a
line from stdin, so the test can act between steps). One JSON line per step goes to
stdout, with the wall-clock time the step ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ringsync.errors import TransportError
from ringsync.inventory import Host
from ringsync.protocol.batch import content_digest, encode_batch
from ringsync.store.gamedb import GameSource
from ringsync.transport.ssh import SshOptions, SshTransport


def _say(**event: Any) -> None:
    print(json.dumps({**event, "t": time.time()}), flush=True)


def _db_payload(path: str) -> tuple[bytes, int]:
    source = GameSource(Path(path))
    try:
        (batch,) = source.extract([g.game_id for g in source.scan()], source_node="selfplay-1")
    finally:
        source.close()
    return encode_batch(batch), len(batch.game_ids)


async def _step(transport: SshTransport, peer: Host, step: Any) -> None:
    if step == "wait":
        await asyncio.to_thread(sys.stdin.readline)
        _say(event="resumed")
        return
    if "push_random" in step:
        payload, games = os.urandom(int(step["push_random"])), 0
    else:
        payload, games = _db_payload(step["push_db"])
    _say(event="pushing", bytes=len(payload), games=games)
    try:
        result = await transport.push_games(peer, payload, content_digest(payload))
    except TransportError as exc:
        _say(event="failed", error=type(exc).__name__, message=str(exc))
    else:
        _say(event="pushed", inserted=result.inserted, duplicates=result.duplicates)


async def main(spec: dict[str, Any]) -> None:
    peer = Host(**spec["peer"])
    options = SshOptions(known_hosts=Path(spec["known_hosts"]),
                         keepalive_interval=spec["keepalive_interval"],
                         keepalive_count_max=spec["keepalive_count_max"], connect_timeout=5.0)
    transport = SshTransport("selfplay-1", spec["token"], options)
    try:
        _say(event="connected", data_dir_id=await transport.peer_data_dir_id(peer))
        for step in spec["steps"]:
            await _step(transport, peer, step)
    finally:
        await transport.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

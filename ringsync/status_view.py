"""`ringsync status`: ask nodes for their /v1/status and show it to a person or a program."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from ringsync.inventory import Host
from ringsync.settings import Settings
from ringsync.transport.http import peer_url


async def fetch_status(session: aiohttp.ClientSession, host: Host) -> dict[str, Any]:
    """One node's status, or {"node": name, "error": why} when it cannot be had."""
    try:
        async with session.get(peer_url(host, "/v1/status")) as resp:
            if resp.status != 200:
                return {"node": host.name, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            data = await resp.json()
            return data if isinstance(data, dict) else {"node": host.name, "error": "malformed status"}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"node": host.name, "error": f"unreachable: {type(exc).__name__} {exc}"}


def _hosts(settings: Settings, everyone: bool) -> list[Host]:
    if everyone:
        return list(settings.inventory.hosts.values())
    own = settings.inventory.hosts.get(settings.node_id) or Host(name=settings.node_id)
    host = "127.0.0.1" if settings.p2p_host in ("0.0.0.0", "::") else settings.p2p_host
    return [Host(name=own.name, role=own.role, p2p_host=host, p2p_port=settings.p2p_port)]


async def collect(settings: Settings, everyone: bool) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {settings.auth_token}"} if settings.auth_token else {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        return list(await asyncio.gather(*(fetch_status(session, h) for h in _hosts(settings, everyone))))


def render(statuses: list[dict[str, Any]]) -> str:
    lines = [f"{'node':<20} {'role':<22} {'daemons':<34} {'received':>9} {'owed':>7}  targets"]
    for st in statuses:
        if "error" in st:
            lines.append(f"{st['node']:<20} {'?':<22} {st['error']}")
            continue
        daemons = " ".join(f"{n}={d['state']}" for n, d in sorted(st.get("daemons", {}).items()))
        pending = sum(st.get("manifest", {}).get("pending", {}).values())
        targets = ",".join(st.get("routing", {}).get("targets", [])) or "-"
        lines.append(f"{st['node']:<20} {st.get('role', '?'):<22} {daemons:<34} "
                     f"{st.get('received_total', 0):>9} {pending:>7}  {targets}")
    return "\n".join(lines)


async def show_status(settings: Settings, *, as_json: bool, everyone: bool) -> int:
    statuses = await collect(settings, everyone)
    print(json.dumps(statuses, indent=2, sort_keys=True) if as_json else render(statuses))
    return 1 if any("error" in s for s in statuses) else 0

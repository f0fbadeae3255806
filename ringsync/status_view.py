"""`ringsync status`: ask nodes for their /v1/status and show it to a person or a program."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp

from ringsync.inventory import Host
from ringsync.settings import Settings

CONNECT_TIMEOUT = 3.0
TOTAL_TIMEOUT = 8.0
MAX_PARALLEL = 64  # open connections at once, so a 1000-node inventory is asked in waves
TOKEN_HELP = "set RINGRIFT_CLUSTER_AUTH_TOKEN(_FILE) (or --token-file) to the cluster token"


def unreachable(host: Host, reason: str) -> str:
    return (f"unreachable: {reason}; check that ringsync runs there (systemctl status "
            f"ringsync@<profile>) and that port {host.p2p_port} is open")


async def fetch_status(session: aiohttp.ClientSession, host: Host, *, has_token: bool = True
                       ) -> dict[str, Any]:
    """One node's status, or {"node": name, "error": why and what to do} when it cannot be had."""
    try:
        async with session.get(host.url("/v1/status")) as resp:
            if resp.status == 401:
                why = "token rejected" if has_token else "no token sent"
                return {"node": host.name, "error": f"{why}: {TOKEN_HELP}"}
            if resp.status != 200:
                return {"node": host.name, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            data = await resp.json()
            return data if isinstance(data, dict) else {"node": host.name, "error": "malformed status"}
    except TimeoutError:
        return {"node": host.name, "error": unreachable(host, f"no answer from "
                                                        f"{host.address}:{host.p2p_port} in time")}
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error)
        return {"node": host.name, "error": unreachable(host, f"{host.address}:{host.p2p_port}: {reason}")}
    except (aiohttp.ClientError, ValueError) as exc:
        return {"node": host.name, "error": unreachable(host, f"{type(exc).__name__}: {exc}")}


def _hosts(settings: Settings, everyone: bool) -> list[Host]:
    if everyone:
        return list(settings.inventory.hosts.values())
    own = settings.inventory.hosts.get(settings.node_id) or Host(name=settings.node_id)
    host = "127.0.0.1" if settings.p2p_host in ("0.0.0.0", "::") else settings.p2p_host
    return [Host(name=own.name, role=own.role, p2p_host=host, p2p_port=settings.p2p_port)]


async def collect(settings: Settings, everyone: bool) -> list[dict[str, Any]]:
    """Every asked node's status, concurrently, each bounded in time."""
    token = settings.auth_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=MAX_PARALLEL)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        asks = (fetch_status(session, h, has_token=token is not None) for h in _hosts(settings, everyone))
        return list(await asyncio.gather(*asks))


def render(statuses: list[dict[str, Any]]) -> str:
    lines = [f"{'node':<20} {'role':<22} {'daemons':<34} {'received':>9} {'owed':>7}  targets"]
    for st in statuses:
        if "error" in st:
            lines.append(f"{st['node']:<20} {'?':<22} {st['error']}")
            continue
        daemons = " ".join(f"{n}={d['state']}" for n, d in sorted(st.get("daemons", {}).items()))
        pending = sum(st.get("manifest", {}).get("pending", {}).values())
        routing = st.get("routing", {})
        targets = ",".join(routing.get("targets", [])) or "-"
        skipped = routing.get("auto_sync_skipped")
        if skipped:
            targets += f" (auto-sync skipped: {skipped})"
        lines.append(f"{st['node']:<20} {st.get('role', '?'):<22} {daemons:<34} "
                     f"{st.get('received_total', 0):>9} {pending:>7}  {targets}")
    problems = [f"  {st['node']} {name}: {d['detail']}" for st in statuses
                for name, d in sorted(st.get("daemons", {}).items())
                if d.get("state") not in ("healthy", None) and d.get("detail")]
    if problems:  # e.g. a source DB that cannot be read, a peer refusing batches
        lines += ["", "problems:", *problems]
    circuits = [f"  {st['node']} -> {c['peer']}: circuit {c['state']} over {c['transport']} "
                f"since {c['since']} ({c['seconds']}s)" for st in statuses
                for c in st.get("circuits", [])]
    if circuits:  # every breaker not closed, whatever it guards: games, files, rsync, aria2
        lines += ["", "circuits not closed:", *circuits]
    return "\n".join(lines)


async def show_status(settings: Settings, *, as_json: bool, everyone: bool) -> int:
    """Print the table (or JSON); 1 when any node could not be asked."""
    if settings.auth_token is None:
        print(f"ringsync status: no cluster token configured; nodes that listen beyond loopback "
              f"will refuse. {TOKEN_HELP}", file=sys.stderr)
    statuses = await collect(settings, everyone)
    print(json.dumps(statuses, indent=2, sort_keys=True) if as_json else render(statuses))
    return 1 if any("error" in s for s in statuses) else 0

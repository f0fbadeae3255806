"""Peer-controlled text made safe to log and to echo: quoted, escaped and bounded."""

from __future__ import annotations

import os

__all__ = ["bounded", "quoted"]

DEFAULT_LIMIT = 200


def quoted(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters: one line, never a forged one."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}…(+{len(text) - limit} chars)"


def bounded(text: str, limit: int = 2 * DEFAULT_LIMIT) -> str:
    """Our own message that may embed peer text: control characters escaped, at most
    ``limit`` characters (plus a note of how many were cut)."""
    cut = len(text) - limit
    head = text[:limit] if cut > 0 else text
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return safe + (f"…(+{cut} chars)" if cut > 0 else "")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child (ssh, rsync, aria2c), without the cluster
    token: a child needs none (aria2c reads it from a 0600 file), and a child's environment
    is readable in /proc by its user."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("RINGRIFT_") and "TOKEN" in k)}
    env.update(extra)
    return env

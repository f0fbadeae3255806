"""Peer-controlled text made safe to log and to echo: quoted, escaped and bounded."""

from __future__ import annotations

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

"""DaemonRegistry: which class builds each DaemonType from a node's context."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ringsync.daemons.base import Daemon, DaemonType
from ringsync.daemons.manager import DaemonFactory
from ringsync.errors import ConfigError

CtxT = TypeVar("CtxT")

ContextFactory = Callable[[CtxT], Daemon]
"""Builds a daemon from a context; a Daemon subclass whose __init__ takes the context fits."""


class DaemonRegistry(Generic[CtxT]):
    """Maps each DaemonType to a factory taking the node's context (e.g. NodeContext).

    Adding a daemon type is one module plus one ``register`` line.
    """

    def __init__(self) -> None:
        self._factories: dict[DaemonType, ContextFactory[CtxT]] = {}

    def register(self, daemon_type: DaemonType, factory: ContextFactory[CtxT]) -> None:
        if daemon_type in self._factories:
            raise ConfigError(f"daemon type {daemon_type.value!r} is already registered")
        self._factories[daemon_type] = factory

    def factories_for(self, ctx: CtxT) -> dict[DaemonType, DaemonFactory]:
        """Zero-argument factories bound to ``ctx``, as DaemonManager takes them."""
        return {t: functools.partial(factory, ctx) for t, factory in self._factories.items()}

    def __contains__(self, daemon_type: object) -> bool:
        return daemon_type in self._factories

    def __iter__(self) -> Iterator[DaemonType]:
        return iter(self._factories)

"""
Remote engines: kvtwist nodes that keep their data in Redis, Redis Cluster
or etcd, so that many nodes share one store.

Each engine is one ``IRemoteStore`` (kvtwist.storage.interface) that is
also a Twisted service: it connects when the service starts and closes its
connections when it stops. ``openEngine`` picks the engine by the URL's
scheme and imports only that engine's module, so a server in memory loads
none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from twisted.logger import Logger

DEFAULT_KEY_PREFIX = "kvtwist:"
DEFAULT_STORE_TIMEOUT = 2.0


@dataclass(frozen=True)
class EngineOptions:
    """How a node uses its engine; the same for every engine."""

    # Put before every key, so that kvtwist can share an engine with other applications.
    keyPrefix: str = DEFAULT_KEY_PREFIX
    # Seconds within which every request gets its answer or "store unavailable".
    timeout: float = DEFAULT_STORE_TIMEOUT
    # Connections to each engine server, shared by every client connection.
    connections: int = 4
    # Operations sent or waiting at once, past which requests are refused at
    # once with "store unavailable (too many requests waiting)".
    maxPending: int = 100_000


class EngineURLError(ValueError):
    """A --store URL that names no usable engine; the text says why."""


# scheme -> module (under kvtwist.engines) whose fromURL opens it.
SCHEMES = {
    "redis": "redis",
    "rediss": "redis",
    "redis-cluster": "rediscluster",
    "etcd": "etcd",
}


def openEngine(url: str, options: EngineOptions, reactor: Any) -> Any:
    """
    The engine a ``--store`` URL names (an ``IRemoteStore`` and ``IService``).

    Raises ``EngineURLError`` for a URL no engine takes, and ``ImportError``
    when the engine's client library (an extra) is not installed.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise EngineURLError(
            f"{url!r}: expected memory, redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB], "
            "redis-cluster://HOST:PORT[,HOST:PORT...] or etcd://HOST:PORT[,HOST:PORT...]"
        )
    module = import_module(f"kvtwist.engines.{SCHEMES[scheme]}")
    return module.fromURL(url, options, reactor)


def announceEngine(engine: Any) -> None:
    """The start-up line that says where the data lives, before the server listens."""
    Logger().info("kvstore: store: {store}", store=engine.describe())

"""
The factory every connection shares: the store, and the limits on requests and connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvtwist import compiled
from kvtwist.histogram import Histogram
from kvtwist.server.protocol import (
    CLOSE_GRACE, DEFAULT_MAX_REQUEST, DEFAULT_REQUEST_TIMEOUT, TIME_EVERY, KVProtocol, StreamTransport,
)
from kvtwist.server.stats import LATENCY_BUCKETS, ServerStats
from kvtwist.storage.interface import IRemoteStore, IStore

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import ChunkRunner

DEFAULT_MAX_CONNECTIONS = 10000
TOO_MANY = b"Error: too many connections\n"


class _Refusal(Protocol):
    """Tells a connection over the limit why it is being closed, and closes it, read or not."""

    factory: KVFactory

    def connectionMade(self) -> None:
        transport = cast(StreamTransport, self.transport)
        self.factory.stats.refused["limit"] += 1
        transport.write(TOO_MANY)
        transport.loseConnection()
        self._abort = self.factory.reactor.callLater(CLOSE_GRACE, transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort.active():
            self._abort.cancel()


if TYPE_CHECKING:
    FactoryBase = Factory[Protocol]
else:
    # Twisted 25.5, the newest with TLS on PyPy 3.9, cannot subscript Factory.
    FactoryBase = Factory


class KVFactory(FactoryBase):
    """
    Owns the one store that every connection shares, and the limits.

    The store is all the server knows of where data lives: an ``IStore``
    in this process (in memory, or journaled to disk), or an
    ``IRemoteStore`` that many nodes share; exactly one of ``store`` and
    ``remote`` is set. ``stats`` counts what the
    connections do (``kvtwist.server.stats``). ``reactor`` runs every
    timer of the connections (tests pass a ``Clock``); ``password``, when
    set, must be given with ``auth`` before anything else.
    """

    protocol = KVProtocol
    # Twisted's own "KVFactory starting on N" says it already.
    noisy = False
    _log = Logger()

    def __init__(
        self,
        store: IStore | IRemoteStore,
        maxRequest: int = DEFAULT_MAX_REQUEST,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        idleTimeout: float = 0,
        requestTimeout: float = DEFAULT_REQUEST_TIMEOUT,
        password: bytes | None = None,
        reactor: Any = None,
        timing: bool = False,
        logConnections: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store: IStore | None = None
        self.remote: IRemoteStore | None = None
        if isinstance(store, IRemoteStore):
            self.remote = store
        else:
            self.store = store
        self.maxRequest = maxRequest
        self.maxConnections = maxConnections
        self.idleTimeout = idleTimeout
        self.requestTimeout = requestTimeout
        self.password = password
        self.reactor = reactor
        self.connections = 0
        latency = Histogram(LATENCY_BUCKETS)
        # The in-memory fast path in C, for a store that runs chunks there;
        # it counts what it runs, and the stats read those counts. With
        # --metrics it samples the latency of the chunks it runs, too.
        self.runner: ChunkRunner | None = None
        if compiled.ChunkRunner is not None and type(store) is compiled.CompiledStore:
            self.runner = compiled.ChunkRunner(store, maxRequest, latency if timing else None, TIME_EVERY)
        self.stats = ServerStats(latency, countedInC=self.runner)
        # Whether to sample chunks' latency (two clock readings a chunk timed): with --metrics.
        self.timing = timing
        # Log each connection's open and close (--log-connections); never each request.
        self.logConnections = logConnections

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.connections >= self.maxConnections:
            refusal = _Refusal()
            refusal.factory = self
            return refusal
        return super().buildProtocol(addr)

"""
The factory every connection shares: the store, and the limits on requests and connections.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from kvtwist.server.protocol import DEFAULT_MAX_REQUEST, KVProtocol
from kvtwist.storage.interface import IStore

DEFAULT_MAX_CONNECTIONS = 10000
TOO_MANY = b"Error: too many connections\n"


class _Refusal(Protocol):
    """Tells a connection over the limit why it is being closed."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(TOO_MANY)
        self.transport.loseConnection()


class KVFactory(Factory[Protocol]):
    """
    Owns the one store that every connection shares, and the limits.

    The store is all the server knows of where data lives (``IStore``):
    in memory, journaled to disk, or elsewhere.
    """

    protocol = KVProtocol
    _log = Logger()

    def __init__(
        self,
        store: IStore,
        maxRequest: int = DEFAULT_MAX_REQUEST,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        idleTimeout: float = 0,
    ) -> None:
        self.store = store
        self.maxRequest = maxRequest
        self.maxConnections = maxConnections
        self.idleTimeout = idleTimeout
        self.connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.connections >= self.maxConnections:
            refusal = _Refusal()
            refusal.factory = self
            return refusal
        return super().buildProtocol(addr)

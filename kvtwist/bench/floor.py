"""
The floor under kvtwist's speed: its connection handling with no requests to run.

``FloorProtocol`` is ``KVProtocol`` with the work taken out: it answers
every request line with ``OK`` without parsing it or touching a store, and
sends the answers the way kvtwist does. What it costs per request is what
Twisted's event loop and a socket read and write cost on this interpreter,
so no kvtwist, however fast its own code, can serve more than it does. The
harness measures it in the same rounds as kvtwist and Redis, which turns
"this target is out of reach" into a figure (docs/performance.md).

Run on its own: ``python -m kvtwist.bench.floor [ENDPOINT]``; it prints the
port it listens on.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, endpoints, task

# All the floor takes from kvtwist: a connection's set-up, which reads only
# the attributes of FloorFactory below, and its reply path, entered as
# the store enters it (IReplyTarget.sendReplies); not KVFactory (only the
# base class that every supported Twisted accepts), nor a store.
from kvtwist.server.factory import FactoryBase
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST, KVProtocol
from kvtwist.server.stats import ServerStats
from kvtwist.storage.interface import Batch

DEFAULT_ENDPOINT = "tcp:0:interface=127.0.0.1"
OK = b"OK\n"


class FloorProtocol(KVProtocol):
    """kvtwist's connection and reply path, doing nothing per request."""

    def dataReceived(self, data: bytes) -> None:
        count = data.count(b"\n")
        if count:
            self.sendReplies(Batch(OK * count))


class FloorFactory(FactoryBase):
    """What ``KVProtocol`` reads from its factory when a connection opens and closes, and no more."""

    protocol = FloorProtocol
    idleTimeout = 0.0
    password = None
    logConnections = False
    # No latency measured: the floor measures nothing but the read and the write.
    timing = False
    maxRequest = DEFAULT_MAX_REQUEST
    # No store: a FloorProtocol runs no request.
    store = None
    remote = None

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.connections = 0
        self.stats = ServerStats()


@defer.inlineCallbacks
def serve(reactor: Any, description: str = DEFAULT_ENDPOINT) -> Any:
    factory = FloorFactory(reactor)
    port = yield endpoints.serverFromString(reactor, description).listen(factory)
    print(f"floor listening on port {port.getHost().port}", flush=True)
    # Serve until the process is stopped.
    yield defer.Deferred()


def main() -> None:
    task.react(serve, sys.argv[1:2])


if __name__ == "__main__":
    main()

"""
Sending straight to a TCP socket when nothing is queued before the bytes:
replies to clients (``tcp.Server``) and pipelines to a remote engine
(``tcp.Client``).

``transport.write`` only queues: the bytes leave on a later reactor turn,
after one epoll_ctl to watch the socket for writability and one to stop.
For small writes that costs about a quarter of the server's CPU
(docs/performance.md). Sending at once is safe only when nothing written
earlier is still queued, and Twisted keeps its queue in attributes it does
not promise to keep: ``dataBuffer`` and ``_tempDataLen``, with
``writeSomeData`` to send. This module is the one place that touches them.
It checks once, at import, that this Twisted's server and client
connections both have them; if not, every write takes the ordinary path.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.internet import abstract, tcp

# What the fast path reads or calls on a tcp.Server or tcp.Client, beyond ITransport.
_PRIVATE = ("dataBuffer", "_tempDataLen", "writeSomeData", "connected", "disconnecting")


def supports(descriptorType: type[abstract.FileDescriptor]) -> bool:
    """Whether transports of ``descriptorType`` have every attribute the fast path relies on."""
    probe = descriptorType.__new__(descriptorType)
    # FileDescriptor.__init__ only stores the reactor and sets up the queue.
    abstract.FileDescriptor.__init__(probe, reactor=cast(Any, object()))
    return all(hasattr(probe, name) for name in _PRIVATE)


def _sendNow(transport: Any, data: bytes) -> bytes:
    """Give the kernel what it takes of ``data`` at once, if that keeps the order; return the rest."""
    kind = type(transport)
    if (
        (kind is tcp.Server or kind is tcp.Client)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        sent = transport.writeSomeData(data)
        # An exception instead of a count means the connection is gone; the
        # reactor finds that out on its own, as for any write.
        if isinstance(sent, int):
            return data[sent:]
    return data


def _sendLater(transport: Any, data: bytes) -> bytes:
    return data


ENABLED = supports(tcp.Server) and supports(tcp.Client)
# sendNow(transport, data) -> what is left for transport.write.
sendNow: Callable[[Any, bytes], bytes] = _sendNow if ENABLED else _sendLater

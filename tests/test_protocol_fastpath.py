"""
The direct-send fast path of KVProtocol, on real TCP sockets.

The transports are real ``tcp.Server`` objects over a connected loopback
socket pair, driven by hand on a MemoryReactor: what the reactor would do
later is visible as "registered for writing", and nothing runs unless the
test calls it.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock

from kvtwist.server.factory import KVFactory
from kvtwist.server.protocol import READ_SIZE, KVProtocol
from kvtwist.storage.memory import MemoryStore


def waiting(sock: socket.socket) -> bytes:
    """Everything ``sock`` has received so far, without waiting for more."""
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class Pair:
    def __init__(self, sndbuf: int | None = None) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname())
            serverSock, addr = listener.accept()
        if sndbuf:
            serverSock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        serverSock.setblocking(False)
        self.reactor = MemoryReactorClock()
        factory = KVFactory(MemoryStore(), reactor=self.reactor)
        self.protocol: KVProtocol = factory.buildProtocol(addr)  # type: ignore[assignment]
        self.transport = tcp.Server(serverSock, self.protocol, addr, None, 1, self.reactor)  # type: ignore[arg-type]
        self.protocol.makeConnection(self.transport)

    def queued(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def received(self) -> bytes:
        return waiting(self.client)

    def close(self) -> None:
        self.client.close()
        self.transport.socket.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_replies_leave_without_a_reactor_turn(pair: Pair) -> None:
    pair.protocol.dataReceived(b"put 1 2\nget 1\n")
    assert not pair.queued()
    assert pair.received() == b"OK\n2\n"


def test_what_the_kernel_refuses_is_queued_and_order_is_kept() -> None:
    pair = Pair(sndbuf=4096)
    try:
        pair.protocol.dataReceived(b"put 7 1234567\n")
        many = 20000
        pair.protocol.dataReceived(b"get 7\n" * many)
        # The socket buffers are small: the kernel took only part of it.
        assert pair.queued()
        # A later batch must wait behind the queue, not jump ahead of it.
        pair.protocol.dataReceived(b"get 8\n")
        stream = b""
        deadline = time.monotonic() + 30
        while pair.queued() and time.monotonic() < deadline:
            stream += pair.received()
            # What the reactor does once the socket is writable again.
            select.select([], [pair.transport.socket], [], 0.05)
            pair.transport.doWrite()
        expected = b"OK\n" + b"1234567\n" * many + b"Key not found\n"
        # The kernel may still hold the tail of it.
        pair.client.settimeout(5)
        while len(stream) < len(expected):
            chunk = pair.client.recv(1 << 16)
            if not chunk:
                break
            stream += chunk
        assert stream == expected
    finally:
        pair.close()


def test_reads_are_sized_for_requests_not_bulk_data(pair: Pair) -> None:
    put = b"put 5 " + b"0" * (READ_SIZE - 8) + b"6\n"
    assert len(put) == READ_SIZE
    pair.client.sendall(put + b"get 5\n")
    select.select([pair.transport.socket], [], [], 5)
    pair.transport.doRead()  # what the reactor does when the socket is readable
    # One read took exactly one READ_SIZE request: the get is still unread.
    assert pair.received() == b"OK\n"
    pair.transport.doRead()
    assert pair.received() == b"6\n"


def test_other_transports_take_the_ordinary_path() -> None:
    from twisted.internet.testing import StringTransport

    from twisted.internet.task import Clock

    protocol = KVFactory(MemoryStore(), reactor=Clock()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"get 1\n")
    assert transport.value() == b"Key not found\n"


def test_this_twisted_has_what_the_fast_path_needs() -> None:
    from kvtwist.server import directsend

    assert directsend.ENABLED and directsend.sendNow is directsend._sendNow


@pytest.mark.parametrize("connection, missing", [(tcp.Server, "_tempDataLen"), (tcp.Client, "dataBuffer")])
def test_a_twisted_whose_connections_lack_the_private_queue_takes_the_ordinary_path(
    connection: type[tcp.Connection], missing: str
) -> None:
    from kvtwist.server import directsend

    class OtherQueue(connection):  # type: ignore[misc, valid-type]
        # As a Twisted that keeps its queue some other way would be.
        def __getattribute__(self, name: str) -> object:
            if name == missing:
                raise AttributeError(name)
            return super().__getattribute__(name)

    assert directsend.supports(connection)
    assert not directsend.supports(OtherQueue)


class ClientPair:
    """A real ``tcp.Client`` (a remote engine's connection) connected to a plain socket, on a MemoryReactor."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        from twisted.internet.protocol import Protocol

        self.protocol = Protocol()
        self.reactor = MemoryReactorClock()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            if rcvbuf:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            protocol = self.protocol

            class Connector:
                def buildProtocol(self, addr: object) -> Protocol:
                    return protocol

            self.transport = tcp.Client("127.0.0.1", listener.getsockname()[1], None, Connector(), self.reactor)  # type: ignore[arg-type]
            if rcvbuf:
                self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
            self.reactor.advance(0)  # what the reactor does first: start connecting
            self.server, _ = listener.accept()
        while not self.transport.connected:
            select.select([], [self.transport.socket], [], 1)
            self.transport.doConnect()

    def queued(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def received(self) -> bytes:
        return waiting(self.server)

    def close(self) -> None:
        self.server.close()
        self.transport.socket.close()


def test_a_client_connection_sends_without_a_reactor_turn() -> None:
    from kvtwist.server.directsend import sendNow

    pair = ClientPair()
    try:
        assert sendNow(pair.transport, b"*1\r\n$4\r\nPING\r\n") == b""
        assert not pair.queued()
        assert pair.received() == b"*1\r\n$4\r\nPING\r\n"
    finally:
        pair.close()


def test_a_client_connection_keeps_order_when_the_kernel_takes_only_part() -> None:
    from kvtwist.server.directsend import sendNow

    pair = ClientPair(rcvbuf=4096)
    try:
        first = b"".join(b"%08d\n" % n for n in range(200000))
        rest = sendNow(pair.transport, first)
        # The socket buffers are small: the kernel took only part of it.
        assert rest and len(rest) < len(first)
        pair.transport.write(rest)
        assert pair.queued()
        # A later write must wait behind the queue, not jump ahead of it.
        assert sendNow(pair.transport, b"last\n") == b"last\n"
        pair.transport.write(b"last\n")
        stream = b""
        deadline = time.monotonic() + 30
        while pair.queued() and time.monotonic() < deadline:
            stream += pair.received()
            select.select([], [pair.transport.socket], [], 0.05)
            pair.transport.doWrite()
        expected = first + b"last\n"
        pair.server.settimeout(5)
        while len(stream) < len(expected):
            chunk = pair.server.recv(1 << 16)
            if not chunk:
                break
            stream += chunk
        assert stream == expected
    finally:
        pair.close()

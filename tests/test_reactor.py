"""
kvtwist's reactor (``kvtwist.server.reactor``) against Twisted's epoll
reactor, on real sockets: the same legacy log context during a dispatch,
the same errors logged with the same prefixes; and a real ``twistd``
that runs on it unless told otherwise.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from twisted.internet import abstract, epollreactor, protocol
from twisted.internet.error import ConnectionDone
from twisted.logger import LogEvent, capturedLogs
from twisted.python import log
from twisted.python.failure import Failure

from kvtwist.server.reactor import BUGGY_PREFIX, LazyContextEPollReactor
from serverproc import session, start_server

REACTORS = [epollreactor.EPollReactor, LazyContextEPollReactor]


@pytest.fixture(params=REACTORS, ids=lambda kind: kind.__name__)
def reactor(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh reactor of each kind, never installed: the tests iterate it themselves."""
    made = request.param()
    yield made
    for selectable in made.removeAll():
        selectable.connectionLost(Failure(ConnectionDone()))
    # Its waker and its epoll descriptor, which a reactor closes only at exit.
    for waker in list(made._internalReaders):
        made.removeReader(waker)
        waker.connectionLost(None)
    made._poller.close()


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def iterateUntil(reactor: Any, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        reactor.iterate(0.01)


class Recording(protocol.Protocol):
    """Logs each chunk it reads the legacy way, and notes the prefix its transport gives."""

    prefixes: list[str]

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.prefixes.append(self.transport.logPrefix())
        if data.startswith(b"boom"):
            raise ValueError("a bug in dataReceived")
        log.msg("read " + data.decode())


def serve(reactor: Any, protocolClass: type[protocol.Protocol]) -> tuple[list[str], int]:
    prefixes: list[str] = []
    factory = protocol.Factory.forProtocol(type("P", (protocolClass,), {"prefixes": prefixes}))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return prefixes, port.getHost().port


# Legacy events (log.msg, log.err) reach observers with their legacy keys.


def systems(events: Sequence[LogEvent], text: str) -> list[str]:
    """The system of each event whose message is ``text``."""
    return [e["system"] for e in events if e.get("message") == (text,)]


def failures(events: Sequence[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("failure") is not None]


def test_a_legacy_event_in_a_read_carries_the_connections_prefix(reactor: Any, logged: Sequence[LogEvent]) -> None:
    prefixes, port = serve(reactor, Recording)
    with socket.create_connection(("127.0.0.1", port)) as a, socket.create_connection(("127.0.0.1", port)) as b:
        a.sendall(b"from a")
        iterateUntil(reactor, lambda: len(prefixes) == 1)
        b.sendall(b"from b")
        iterateUntil(reactor, lambda: len(prefixes) == 2)
    assert prefixes[0] != prefixes[1], "two connections, two prefixes"
    assert systems(logged, "read from a") == [prefixes[0]]
    assert systems(logged, "read from b") == [prefixes[1]]


def test_outside_a_dispatch_the_context_is_the_one_around_the_reactor(reactor: Any, logged: Sequence[LogEvent]) -> None:
    prefixes, port = serve(reactor, Recording)
    fired: list[bool] = []
    with socket.create_connection(("127.0.0.1", port)) as a:
        a.sendall(b"x")
        iterateUntil(reactor, lambda: bool(prefixes))
        reactor.callLater(0, lambda: (log.msg("timed call"), fired.append(True)))
        iterateUntil(reactor, lambda: bool(fired))
    assert systems(logged, "timed call") == ["-"]


def test_a_bug_in_a_read_is_logged_with_the_prefix_and_drops_only_that_connection(
    reactor: Any, logged: Sequence[LogEvent]
) -> None:
    prefixes, port = serve(reactor, Recording)
    with socket.create_connection(("127.0.0.1", port)) as bad, socket.create_connection(("127.0.0.1", port)) as good:
        bad.sendall(b"boom")
        iterateUntil(reactor, lambda: len(prefixes) == 1)
        bad.settimeout(0.01)
        iterateUntil(reactor, lambda: _closedByPeer(bad))
        good.sendall(b"still served")
        iterateUntil(reactor, lambda: len(prefixes) == 2)
    [failure] = failures(logged)
    assert failure["failure"].check(ValueError)
    assert failure["system"] == prefixes[0]
    assert systems(logged, "read still served") == [prefixes[1]]


class SocketReader(abstract.FileDescriptor):
    """One end of a socket pair, read by the reactor: a descriptor as an application could write it."""

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        super().__init__(reactor)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "SocketReader"

    def doRead(self) -> Any:
        log.msg(f"read {self.sock.recv(100).decode()}")
        return None

    def connectionLost(self, reason: Any) -> None:
        self.reactor.removeReader(self)


class BuggyPrefix(SocketReader):
    def logPrefix(self) -> str:
        raise RuntimeError("a bug in logPrefix")


class ClosesBadly(SocketReader):
    """Its connectionLost raises: the one error that a dispatch itself lets through."""

    def doRead(self) -> Any:
        self.sock.recv(100)
        return ConnectionDone()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        raise RuntimeError("a bug in connectionLost")


def readUntilAnError(reactor: Any, kind: type[SocketReader], logged: Sequence[LogEvent]) -> SocketReader:
    """Read one byte with a descriptor of ``kind``, on one end of a socket pair, until an error is logged."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        descriptor = kind(reactor, ours)
        reactor.addReader(descriptor)
        theirs.sendall(b"x")
        iterateUntil(reactor, lambda: bool(failures(logged)))
        if descriptor in reactor.getReaders():
            reactor.removeReader(descriptor)
    return descriptor


def test_a_logprefix_that_raises_gives_the_buggy_prefix(reactor: Any, logged: Sequence[LogEvent]) -> None:
    readUntilAnError(reactor, BuggyPrefix, logged)
    assert systems(logged, "read x") == [BUGGY_PREFIX]
    errors = failures(logged)
    assert errors and all(e["failure"].check(RuntimeError) for e in errors)
    assert all(e["system"] == BUGGY_PREFIX for e in errors)


def test_an_error_escaping_a_dispatch_is_logged_with_the_prefix(reactor: Any, logged: Sequence[LogEvent]) -> None:
    descriptor = readUntilAnError(reactor, ClosesBadly, logged)
    [failure] = failures(logged)
    assert failure["failure"].check(RuntimeError)
    assert failure["system"] == "SocketReader"
    assert descriptor not in reactor.getReaders(), "disconnected"


def _closedByPeer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# A real twistd: kvstore installs kvtwist's reactor unless twistd was told which.


def test_twistd_kvstore_runs_on_kvtwists_reactor() -> None:
    server = start_server()
    try:
        assert session(server, b"put 1 2\nget 1\n") == b"OK\n2\nGoodbye\n"
    finally:
        server.stop()
    assert "reactor class: kvtwist.server.reactor.LazyContextEPollReactor." in server.log_text()


@pytest.mark.parametrize(
    "name, installed",
    [("epoll", "twisted.internet.epollreactor.EPollReactor"), ("kvepoll", "kvtwist.server.reactor.LazyContextEPollReactor")],
)
def test_twistds_reactor_option_wins(name: str, installed: str) -> None:
    server = start_server(twistdOptions=(f"--reactor={name}",))
    try:
        assert session(server, b"put 1 2\nget 1\n") == b"OK\n2\nGoodbye\n"
    finally:
        server.stop()
    assert f"reactor class: {installed}." in server.log_text()

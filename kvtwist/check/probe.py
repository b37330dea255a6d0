"""
A raw connection that sends exact bytes and records exactly what came back.

The conformance, serving and robustness checks must see the bytes a server
sends, including a stray CR or a reply that never comes, and must be able
to send things no well-behaved client would (half a request, garbage). The
``transcript`` is what a report shows when a check fails.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from kvtwist.client import AuthenticationFailed


def showBytes(data: bytes, limit: int = 120) -> str:
    """``data`` as a Python bytes literal, shortened in the middle if long."""
    if len(data) > limit:
        return f"{data[: limit // 2]!r} ... ({len(data)} bytes) ... {data[-limit // 4 :]!r}"
    return repr(data)


class Transcript:
    """
    What several connections of one check sent and received, in order.

    Only the first and the last ``keep`` lines are kept, with a count of
    those between: a failing pipelining check must not print twenty
    thousand lines, and the end is where a failure shows.
    """

    def __init__(self, keep: int = 12) -> None:
        self.keep = keep
        self._head: list[str] = []
        self._tail: deque[str] = deque(maxlen=keep)
        self._dropped = 0

    def note(self, text: str) -> None:
        if len(self._head) < self.keep:
            self._head.append(text)
            return
        if len(self._tail) == self.keep:
            self._dropped += 1
        self._tail.append(text)

    def lines(self) -> list[str]:
        middle = [f"... {self._dropped} lines not shown ..."] if self._dropped else []
        return self._head + middle + list(self._tail)


class Probe(Protocol):
    """
    Sends bytes as given and hands out reply lines one by one.

    A reply line is the bytes before an LF, with nothing stripped: whether a
    CR is acceptable is for the caller (the profile) to decide.
    """

    #: Set by ``makeConnection``; a stream connection's transport can also abort.
    transport: ITCPTransport | None

    def __init__(self, reactor: IReactorTime, name: str, transcript: Transcript) -> None:
        self.reactor = reactor
        self.name = name
        self.transcript = transcript
        self.closed = False
        self._closedHere = False
        self._lines: deque[bytes] = deque()
        self._partial = b""
        self._waiter: Deferred[bytes | None] | None = None
        self._whenClosed: list[Deferred[bool]] = []

    @property
    def connection(self) -> ITCPTransport:
        """The transport of a connected probe."""
        assert self.transport is not None, "not connected"
        return self.transport

    def _note(self, text: str) -> None:
        self.transcript.note(f"{self.name}: {text}")

    def send(self, data: bytes) -> None:
        """Write ``data`` in one write."""
        self._note(f"sent     {showBytes(data)}")
        self.connection.write(data)

    async def authenticate(self, password: bytes, timeout: float) -> None:
        """
        Send ``auth PASSWORD`` and take its ``OK``, so that the check's own exchanges start after it.

        The transcript shows that it happened, never the password. Raises
        ``AuthenticationFailed`` with the server's reply if that is not ``OK``.
        """
        self._note("sent     auth with the password from --password-file")
        self.connection.write(b"auth %s\n" % password)
        reply = await self.nextLine(timeout)
        if reply is None or reply.rstrip(b"\r") != b"OK":
            self.close()
            what = "no reply" if reply is None else repr(reply)
            raise AuthenticationFailed(f"auth with the password from --password-file got {what}, not 'OK'")

    def abort(self) -> None:
        """Drop the connection at once (a TCP reset), as a crashing client would."""
        self._note("aborted the connection")
        self._closedHere = True
        self.connection.abortConnection()

    def close(self) -> None:
        """Close the connection normally."""
        if not self.closed:
            self._closedHere = True
            self.connection.loseConnection()

    def nextLine(self, timeout: float) -> Deferred[bytes | None]:
        """
        The next reply line, or None if none comes within ``timeout`` seconds.

        ``closed`` tells the two kinds of None apart: the server closed the
        connection, or it stayed silent.
        """
        if self._lines:
            return succeed(self._handOut(self._lines.popleft()))
        if self.closed:
            return succeed(None)
        waiter: Deferred[bytes | None] = Deferred()
        self._waiter = waiter

        def silent(failure: Failure) -> None:
            failure.trap(TimeoutError)
            self._waiter = None
            self._note(f"no reply within {timeout:g} s")
            return None

        return waiter.addTimeout(timeout, self.reactor).addErrback(silent)

    def waitClosed(self, timeout: float) -> Deferred[bool]:
        """True once the server has closed the connection; False if it has not within ``timeout``."""
        if self.closed:
            return succeed(True)
        done: Deferred[bool] = Deferred()
        self._whenClosed.append(done)

        def stillOpen(failure: Failure) -> bool:
            failure.trap(TimeoutError)
            self._whenClosed.remove(done)
            self._note(f"still open after {timeout:g} s")
            return False

        return done.addTimeout(timeout, self.reactor).addErrback(stillOpen)

    def _handOut(self, line: bytes) -> bytes:
        # Lines enter the transcript when they are read, not when they
        # arrive, so a transcript ends at the reply that failed a check.
        self._note("received " + showBytes(line + b"\n"))
        return line

    def dataReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._lines.extend(lines)
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self._partial:
            self._note(f"received {showBytes(self._partial)} (no line end)")
        if self._closedHere:
            self._note("connection closed")
        elif reason.check(ConnectionDone):
            self._note("connection closed by the server")
        else:
            self._note(f"connection lost: {reason.getErrorMessage()}")
        self._wake()
        waiting, self._whenClosed = self._whenClosed, []
        for done in waiting:
            done.callback(True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        if self._lines:
            self._waiter = None
            waiter.callback(self._handOut(self._lines.popleft()))
        elif self.closed:
            self._waiter = None
            waiter.callback(None)


def openProbe(
    reactor: IReactorTime, endpoint: IStreamClientEndpoint, name: str, transcript: Transcript
) -> Deferred[Probe]:
    """Connect a new ``Probe``; ``name`` prefixes its lines in ``transcript``."""
    return connectProtocol(endpoint, Probe(reactor, name, transcript))

"""
The kvtwist wire protocol: one request per line, one reply line per request.

``KVProtocol`` turns received bytes into requests, runs them against the
store that ``KVFactory`` shares between all connections, and sends the
replies. docs/protocol.md is the normative description of what goes over
the wire; this module implements exactly that.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.internet import interfaces, tcp
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from kvtwist.storage.memory import Store, StoreError

DEFAULT_MAX_REQUEST = 4096
DEFAULT_MAX_CONNECTIONS = 10000
# Bytes asked of the kernel per read; see KVProtocol.connectionMade.
READ_SIZE = 4096

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

OK = b"OK\n"
EXISTS = b"Key already exists\n"
NOT_FOUND = b"Key not found\n"
GOODBYE = b"Goodbye\n"
TOO_LONG = b"Error: request too long\n"
TOO_MANY = b"Error: too many connections\n"
IDLE = b"Error: idle timeout\n"
UNKNOWN = b"Error: unknown command (expected put, get, del or Bye)\n"

# Bytes that only the careful path must look at: a CR may end a line, and
# vertical tab / form feed are not separators here although bytes.split()
# treats them as such.
_NEEDS_CARE = re.compile(rb"[\r\x0b\x0c]")
_SEPARATORS = re.compile(rb"[ \t]+")


def parseInt64(token: bytes) -> int | None:
    """
    The value of an ASCII decimal signed 64-bit integer, or None.

    ``int()`` alone is too lenient: it accepts ``1_000``, surrounding
    whitespace and, for str, non-ASCII digits. ``bytes.isdigit`` is
    ASCII-only, which is exactly the rule we want. Leading zeros are
    stripped before conversion so that a long run of them is neither
    refused by Python's digit limit nor mistaken for an overflow.
    """
    if len(token) < 19 and token.isdigit():
        # The common case, checked first because it is on every request's
        # path: up to 18 plain digits always fit in 64 bits.
        return int(token)
    digits = token[1:] if token[:1] in (b"+", b"-") else token
    if not digits.isdigit():
        return None
    significant = digits.lstrip(b"0")
    if len(significant) > 19:
        return None
    value = int(significant or b"0")
    if token[:1] == b"-":
        value = -value
    if value < INT64_MIN or value > INT64_MAX:
        return None
    return value


def _badInteger(what: str) -> bytes:
    return b"Error: %s must be a signed 64-bit decimal integer\n" % what.encode()


_BAD_KEY = _badInteger("key")
_BAD_VALUE = _badInteger("value")


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
class KVProtocol(Protocol, TimeoutMixin):
    """
    One client connection.

    Requests are split on LF (or NUL) without ever re-scanning bytes already
    looked at, so a client that pipelines thousands of requests costs time
    linear in what it sends. All replies for one received chunk leave in a
    single write, in request order.
    """

    factory: KVFactory
    _log = Logger()

    def __init__(self) -> None:
        self._partial = b""
        self._closing = False

    # Connection life cycle

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.setTimeout(self.factory.idleTimeout or None)
        # Twisted reads up to bufferSize (64 KiB) at a time and allocates a
        # buffer that large for every read; PyPy also clears it. Requests
        # are a few bytes, so a 4 KiB read costs a third less CPU per
        # request on PyPy and a little less on CPython (docs/performance.md).
        # The same number is the reply backlog above which the transport
        # pauses us (below), which suits small replies just as well.
        self.transport.bufferSize = READ_SIZE
        # Flow control: when the client stops reading its replies, the
        # transport pauses us, and we stop reading its requests.
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections -= 1
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        self._finish(IDLE)

    # IPushProducer: the transport calls these about its send buffer.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # IHalfCloseableProtocol: a client that shuts down its sending side
    # still gets the replies to everything it sent.

    def readConnectionLost(self) -> None:
        if self._closing:
            return
        rest, self._partial = self._partial, b""
        # End of input also ends the last request.
        self._finish(self._execute([rest], _NEEDS_CARE.search(rest) is not None))

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    # Parsing

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        if b"\0" in data:
            data = data.replace(b"\0", b"\n")
        buffered = self._partial + data
        lines = buffered.split(b"\n")
        self._partial = lines.pop()
        replies = self._execute(lines, _NEEDS_CARE.search(buffered) is not None)
        if not self._closing and _tooLong(self._partial, self.factory.maxRequest):
            self._partial = b""
            replies += TOO_LONG
            self._closing = True
        if self._closing:
            self._finish(replies)
        elif replies:
            self._respond(replies)

    def _execute(self, lines: list[bytes], careful: bool) -> bytes:
        """
        Run complete requests in order; stop at Bye or at a request over the limit.

        ``careful`` says whether any line holds a CR, VT or FF; most traffic
        has none, and then the fast C-level ``bytes.split`` tokenizes exactly
        as the protocol requires.
        """
        out: list[bytes] = []
        append = out.append
        limit = self.factory.maxRequest
        commands = _COMMANDS
        for line in lines:
            if careful and line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                append(TOO_LONG)
                self._closing = True
                break
            tokens = [t for t in _SEPARATORS.split(line) if t] if careful else line.split()
            if not tokens:
                continue
            entry = commands.get(tokens[0].lower())
            if entry is None:
                append(UNKNOWN)
                continue
            arity, handler, usage = entry
            if len(tokens) - 1 != arity:
                append(b"Error: wrong number of arguments (usage: %s)\n" % usage)
                continue
            append(handler(self, tokens))
            if self._closing:
                break
        return b"".join(out)

    # Commands: each gets the request's tokens and returns its reply line.

    def do_put(self, tokens: list[bytes]) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            return _BAD_KEY
        value = parseInt64(tokens[2])
        if value is None:
            return _BAD_VALUE
        try:
            return OK if self.factory.store.put(key, value) else EXISTS
        except StoreError as e:
            return _storeError(e)

    def do_get(self, tokens: list[bytes]) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            return _BAD_KEY
        try:
            value = self.factory.store.get(key)
        except StoreError as e:
            return _storeError(e)
        return NOT_FOUND if value is None else b"%d\n" % value

    def do_del(self, tokens: list[bytes]) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            return _BAD_KEY
        try:
            return OK if self.factory.store.delete(key) else NOT_FOUND
        except StoreError as e:
            return _storeError(e)

    def do_bye(self, tokens: list[bytes]) -> bytes:
        self._closing = True
        return GOODBYE

    # Replies

    def _respond(self, replies: bytes) -> None:
        self.factory.whenDurable(self._send, replies)

    def _send(self, replies: bytes) -> None:
        """
        Write a batch of replies, straight to the socket when that is safe.

        ``transport.write`` only queues: the bytes leave on a later reactor
        turn, after one epoll_ctl to watch the socket for writability and one
        to stop. For small replies that costs about a quarter of the server's
        CPU (docs/performance.md). So on a plain TCP connection with nothing
        queued, the replies go to the kernel at once and only what it does
        not take is queued. Sending only when the queue is empty keeps the
        order; TLS and any other transport always take the ordinary path.
        """
        transport = self.transport
        if (
            type(transport) is tcp.Server
            and transport.connected
            and not transport.disconnecting
            and not transport.dataBuffer
            # Twisted keeps fresh writes in a private list until its next
            # send; a Twisted without this counter takes the ordinary path.
            and not getattr(transport, "_tempDataLen", True)
        ):
            sent = transport.writeSomeData(replies)
            # An exception instead of a count means the connection is gone;
            # the reactor finds that out on its own, as for any write.
            if isinstance(sent, int):
                if sent == len(replies):
                    return
                replies = replies[sent:]
        transport.write(replies)

    def _finish(self, replies: bytes) -> None:
        """Send the last replies, then close once they are flushed."""
        self._closing = True
        self.setTimeout(None)
        self.transport.pauseProducing()
        if replies:
            self._respond(replies)
        self.factory.whenDurable(self._close)

    def _close(self) -> None:
        # A transport with a paused producer registered would wait for it
        # forever instead of closing; flow control is over at this point.
        self.transport.unregisterProducer()
        self.transport.loseConnection()


# verb -> (number of arguments, handler, usage): one table for every
# connection, and adding a command is one row.
_COMMANDS: dict[bytes, tuple[int, Callable[[KVProtocol, list[bytes]], bytes], bytes]] = {
    b"put": (2, KVProtocol.do_put, b"put KEY VALUE"),
    b"get": (1, KVProtocol.do_get, b"get KEY"),
    b"del": (1, KVProtocol.do_del, b"del KEY"),
    b"bye": (0, KVProtocol.do_bye, b"Bye"),
}


def _tooLong(partial: bytes, limit: int) -> bool:
    """Whether an unfinished request can no longer fit, allowing for a CR before its LF."""
    size = len(partial)
    return size > limit and not (size == limit + 1 and partial.endswith(b"\r"))


def _storeError(error: StoreError) -> bytes:
    # The text comes from the server, never from the client, so it is safe to send.
    return b"Error: %s\n" % str(error).encode("ascii", "replace")


class _Refusal(Protocol):
    """Tells a connection over the limit why it is being closed."""

    def connectionMade(self) -> None:
        self.transport.write(TOO_MANY)
        self.transport.loseConnection()


class KVFactory(Factory):
    """
    Owns the one store that every connection shares, and the limits.

    ``whenDurable`` is the seam through which every reply batch passes: in
    memory it sends at once; a durable store makes replies wait until the
    writes they depend on are on disk.
    """

    protocol = KVProtocol
    _log = Logger()

    def __init__(
        self,
        store: Store | None = None,
        maxRequest: int = DEFAULT_MAX_REQUEST,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        idleTimeout: float = 0,
        whenDurable: Callable[..., None] | None = None,
    ) -> None:
        self.store = Store() if store is None else store
        if whenDurable is not None:
            # A durable store's reply gate replaces the in-memory default.
            self.whenDurable = whenDurable  # type: ignore[method-assign]
        self.maxRequest = maxRequest
        self.maxConnections = maxConnections
        self.idleTimeout = idleTimeout
        self.connections = 0

    def buildProtocol(self, addr: object) -> Protocol:
        if self.connections >= self.maxConnections:
            refusal = _Refusal()
            refusal.factory = self
            return refusal
        return super().buildProtocol(addr)

    def whenDurable(self, f: Callable[..., object], *args: object) -> None:
        """
        Call ``f(*args)`` once the writes its replies depend on are as durable as promised.

        The contract with a durable store (``kvtwist.storage.durable``): the store
        calls made since the previous ``whenDurable`` call produced this
        batch's replies, and ``f`` is a bound method of the connection's
        protocol, so that one connection's batches keep their order.
        """
        f(*args)

"""
The kvtwist wire protocol: one request per line, one reply line per request.

``KVProtocol`` turns received bytes into requests, runs them against the
store that its factory shares between all connections, and sends the
replies when the store delivers them. docs/protocol.md is the normative
description of what goes over the wire; this module implements exactly that.
"""

from __future__ import annotations

import hmac
import re
import time
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Protocol as TypingProtocol, cast

from twisted.internet import interfaces
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from kvtwist import compiled
from kvtwist.server import stats as S
from kvtwist.server.directsend import sendNow
from kvtwist.storage.interface import DELETE, GET, PUT, Batch, IStore, Operation, Outcome, StoreError
from kvtwist.storage.journaled import JournaledStore

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import ChunkRunner, CompiledStore
    from kvtwist.server.factory import KVFactory

DEFAULT_MAX_REQUEST = 4096
# Bytes asked of the kernel per read; see KVProtocol.connectionMade.
READ_SIZE = 4096

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

OK = b"OK\n"
EXISTS = b"Key already exists\n"
NOT_FOUND = b"Key not found\n"
GOODBYE = b"Goodbye\n"
TOO_LONG = b"Error: request too long\n"
IDLE = b"Error: idle timeout\n"
REQUEST_TIMEOUT = b"Error: request timeout\n"
UNKNOWN = b"Error: unknown command (expected put, get, del or Bye)\n"
AUTH_REQUIRED = b"Error: authentication required\n"
BAD_PASSWORD = b"Error: invalid password\n"
NO_PASSWORD = b"Error: no password is set on this server\n"

DEFAULT_REQUEST_TIMEOUT = 30.0
# With --metrics, one chunk in this many of each connection has its latency measured.
TIME_EVERY = 16
# Seconds a connection the server has decided to end is given to take its
# last replies before it is aborted.
CLOSE_GRACE = 3.0
# Wrong passwords before the connection is closed.
AUTH_ATTEMPTS = 3

# Bytes that only the careful path must look at: a CR may end a line, and
# vertical tab / form feed are not separators here although bytes.split()
# treats them as such.
_NEEDS_CARE = re.compile(rb"[\r\x0b\x0c]")
_SEPARATORS = re.compile(rb"[ \t]+")


class StreamTransport(TypingProtocol):
    """What the protocol uses of its transport: TCP, TLS and UNIX transports all offer it."""

    bufferSize: int

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


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
# Stands in a chunk's replies for the reply to a request a remote engine has
# not answered yet; found by identity, never sent.
_AWAITING = b"(awaiting the engine)\n"


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer, interfaces.IHandshakeListener)
class KVProtocol(Protocol, TimeoutMixin):
    """
    One client connection.

    Requests are split on LF (or NUL) without ever re-scanning bytes already
    looked at: an unfinished request is kept in pieces until its end comes,
    so a client costs time linear in what it sends, however long its
    requests may be. The requests of one received chunk form one
    ``Batch``: their replies are delivered through the store together, and
    leave in a single write, in request order. The protocol is the
    batch's ``IReplyTarget``.

    Every connection the server decides to end is gone within a bounded
    time: an unfinished request has ``requestTimeout`` seconds from its
    first byte (a TLS handshake too), and a closing connection has
    ``CLOSE_GRACE`` seconds to take its last replies before it is aborted.
    """

    factory: KVFactory
    # The factory's in-process store, when the data is not in a remote engine.
    _store: IStore
    # The same store when it runs whole chunks in C (kvtwist.compiled), else None.
    _compiled: CompiledStore | None = None
    # The factory's fast path over that store, once the connection may send requests, else None.
    _runner: ChunkRunner | None = None
    # The same runner while a chunk needs nothing else from this connection (_chooseDirect), else None.
    _direct: ChunkRunner | None = None
    # With a remote engine, the compiled parsing and formatting (kvtwist.compiled), else None.
    _remotePath: ModuleType | None = None
    # The store when it is journaled and runs whole chunks in C (a data directory on the compiled path), else None.
    _journaled: JournaledStore | None = None
    _log = Logger()

    def __init__(self) -> None:
        # The unfinished request: its pieces, their total size, and when its
        # first byte came (None while there is none).
        self._pieces: list[bytes] = []
        self._pending = 0
        self._pendingStart: float | None = None
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        self._isClosing = False
        # Flow control has paused reading (the client does not take its replies).
        self._paused = False
        # The connection is gone: a store may still deliver to it (a batch that waited for an fsync).
        self._lost = False
        self._commands = _COMMANDS
        self._authFailures = 0
        # Why the server ended the connection, for the stats (None: the client did).
        self._closeReason: str | None = None
        self._counts: list[int] = []
        # With a remote engine: the operations of the chunk being run, whether
        # a chunk is at the engine now, and what came while it was.
        self._unlocked = _COMMANDS
        self._operations: list[Operation] = []
        self._awaiting = False
        # Reading stopped because a second chunk came while one was at the engine.
        self._heldForEngine = False
        self._backlog: list[bytes] = []
        self._endOfInput = False
        self._lastBatch: Batch | None = None
        # Chunks off the direct path until the next one whose latency is measured (0: none are).
        self._untilTimed = 0

    @property
    def _stream(self) -> StreamTransport:
        # ITransport does not declare flow control or abortConnection,
        # although every stream transport provides them.
        assert self.transport is not None, "not connected"
        return cast(StreamTransport, self.transport)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """Every timer of the connection (``TimeoutMixin``'s too) runs on the factory's reactor."""
        return self.factory.reactor.callLater(period, func)

    # Connection life cycle

    def connectionMade(self) -> None:
        self.factory.connections += 1
        stats = self.factory.stats
        stats.accepted += 1
        self._counts = stats.requests
        if self.factory.timing:
            self._untilTimed = 1
        if self.factory.logConnections:
            self._log.info("kvstore: connection from {peer} opened", peer=_peer(self.transport))
        store = self.factory.store
        if store is not None:
            self._store = store
            if compiled.CompiledStore is not None and type(store) is compiled.CompiledStore:
                self._compiled = store
            elif isinstance(store, JournaledStore) and store.compiled is not None:
                self._journaled = store
        else:
            self._commands = self._unlocked = _REMOTE_COMMANDS
            self._remotePath = compiled.remotePath
        if self.factory.password is not None:
            self._commands = _LOCKED
        else:
            self._runner = self.factory.runner
        self.setTimeout(self.factory.idleTimeout or None)
        self._chooseDirect()
        if interfaces.ISSLTransport.providedBy(self.transport):
            # The handshake has the time of a request: a client that opens
            # a TLS connection and sends nothing more cannot hold it.
            self._startRequestClock()
        # Twisted reads up to bufferSize (64 KiB) at a time and allocates a
        # buffer that large for every read; PyPy also clears it. Requests
        # are a few bytes, so a 4 KiB read costs a third less CPU per
        # request on PyPy and a little less on CPython (docs/performance.md).
        # The same number is the reply backlog above which the transport
        # pauses us (below), which suits small replies just as well.
        self._stream.bufferSize = READ_SIZE
        # Flow control: when the client stops reading its replies, the
        # transport pauses us, and we stop reading its requests.
        self._stream.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.factory.connections -= 1
        self.factory.stats.closed[self._closeReason or "client"] += 1
        if self.factory.logConnections:
            self._log.info(
                "kvstore: connection from {peer} closed: {why} ({detail})", peer=_peer(self.transport),
                why=_CLOSE_REASONS[self._closeReason], detail=reason.getErrorMessage(),
            )
        self.setTimeout(None)
        for timer in (self._deadline, self._abort):
            if timer is not None and timer.active():
                timer.cancel()
        self._deadline = self._abort = None

    # The state that decides whether a chunk may go straight to the
    # compiled runner. Every change of it goes through these setters, so
    # that the choice, made here, is never stale, and a read costs the hot
    # path one attribute instead of five checks.

    @property
    def _closing(self) -> bool:
        """Whether the connection is ending: what comes in is ignored, and the last replies are on their way."""
        return self._isClosing

    @_closing.setter
    def _closing(self, closing: bool) -> None:
        self._isClosing = closing
        self._chooseDirect()

    @property
    def _pendingSince(self) -> float | None:
        """When the unfinished request's first byte came (or unread replies began to wait), else None."""
        return self._pendingStart

    @_pendingSince.setter
    def _pendingSince(self, since: float | None) -> None:
        self._pendingStart = since
        self._chooseDirect()

    def _chooseDirect(self) -> None:
        """
        Let chunks go straight to the compiled runner while nothing else
        applies: the connection may send requests and is not closing, no
        request is unfinished, and there is no idle timer to reset
        (``--idle-timeout``). With ``--metrics``, the runner samples the
        latency of the chunks it runs itself.

        Each of those checks, made on every read, cost about 2% of the
        throughput with 10,000 connections (docs/performance.md).
        """
        runner = self._runner
        if runner is not None and not self._isClosing and self._pendingStart is None and self.timeOut is None:
            self._direct = runner
        else:
            self._direct = None

    def handshakeCompleted(self) -> None:
        if not self._pieces:
            self._pendingSince = None

    def timeoutConnection(self) -> None:
        self._closeReason = "idle"
        self._finish(Batch(IDLE))

    # The request clock: one timer per connection, rearmed only when it
    # fires, so that a chunk costs no timer call, only a clock reading when
    # an unfinished request begins.

    def _startRequestClock(self) -> None:
        self._pendingSince = self.factory.reactor.seconds()
        if self._deadline is None and self.factory.requestTimeout:
            self._deadline = self.callLater(self.factory.requestTimeout, self._checkRequestClock)

    def _checkRequestClock(self) -> None:
        self._deadline = None
        since, timeout = self._pendingSince, self.factory.requestTimeout
        if since is None or self._closing:
            return
        left = since + timeout - self.factory.reactor.seconds()
        if left > 0:
            self._deadline = self.callLater(left, self._checkRequestClock)
        else:
            self._pieces, self._pending = [], 0
            self._closeReason = "request_timeout"
            # (Or replies not taken in time: flow control had paused reading.)
            self._finish(Batch(REQUEST_TIMEOUT))

    # IPushProducer: the transport calls these about its send buffer.

    def pauseProducing(self) -> None:
        self._paused = True
        self._stream.pauseProducing()
        # A client that does not take its replies has the request time to
        # do so: it could otherwise hold its connection for good, as the
        # server reads nothing more from it.
        if self._pendingSince is None:
            self._startRequestClock()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._closing and not self._heldForEngine:
            if not self._pieces:
                self._pendingSince = None
            self._stream.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # IHalfCloseableProtocol: a client that shuts down its sending side
    # still gets the replies to everything it sent.

    def readConnectionLost(self) -> None:
        if self._closing:
            return
        if self._awaiting:
            # After the chunk at the engine, and what came while it was.
            self._endOfInput = True
            return
        rest = b"".join(self._pieces)
        self._pieces, self._pending = [], 0
        # End of input also ends the last request.
        batch = Batch()
        self._closeReason = self._closeReason or "client"
        run = self._run if self._commands is not _LOCKED else self._runLocked
        replies = run([rest], _NEEDS_CARE.search(rest) is not None, batch)
        self._closing = True
        self._complete(replies, batch)

    def writeConnectionLost(self) -> None:
        self._stream.loseConnection()

    # Parsing

    def dataReceived(self, data: bytes) -> None:
        direct = self._direct
        if direct is not None:
            # The common case: an in-memory store that runs chunks in C
            # (kvtwist.compiled), on a connection that may send requests
            # and needs nothing else now (_chooseDirect). The replies are
            # written at once: such a store has nothing to wait for.
            answered, done = direct.run(data)
            if done < len(data):
                # The rest of the chunk (an unusual line, or an unfinished
                # request) takes the ordinary path, after these replies.
                self._receive(data[done:], answered, None)
            elif answered:
                # What _write does for an untimed chunk, without the cost of
                # calling it: this path runs once per read (docs/performance.md).
                self.factory.stats.bytesOut += len(answered)
                answered = sendNow(self.transport, answered)
                if answered:
                    self._stream.write(answered)
            return
        runner = self._runner
        if self._isClosing or self._pendingStart is not None:
            # Closing, or a request begun (an unfinished one always has the
            # request clock running): only the ordinary path knows what to do.
            self._receive(data, b"", None)
        elif runner is not None:
            # The same runner, with an idle timer to reset.
            answered, done = runner.run(data)
            if done < len(data):
                # The rest of the chunk (an unusual line, or an unfinished
                # request) takes the ordinary path, after these replies.
                self._receive(data[done:], answered, None)
                return
            if answered:
                if self.timeOut is not None:
                    self.resetTimeout()
                self._write(answered, 0.0)
        elif self._commands is not self._unlocked:
            self._receive(data, b"", None)
        elif self._journaled is not None:
            # A data directory: run in C, noting in the batch what the
            # replies depend on; they leave as the fsync policy says.
            factory = self.factory
            carried = Batch()
            if self._untilTimed:
                carried.received = self._timeThisChunk()
            prefix, done = self._journaled.runChunk(data, 0, factory.maxRequest, self._counts, carried)
            factory.stats.bytesIn += done
            if done < len(data):
                self._receive(data[done:], prefix, carried)
            elif prefix:
                carried.replies = prefix
                if self.timeOut is not None:
                    self.resetTimeout()
                self._deliver(carried)
        elif self._remotePath is not None and not self._awaiting:
            # With a remote engine, and no chunk at it: parsed into the
            # chunk's operations. (Parsing changes nothing, so a chunk it
            # cannot take whole simply takes the ordinary path.)
            operations, done = self._remotePath.parseChunk(data, self.factory.maxRequest)
            if done < len(data) or not operations:
                self._receive(data, b"", None)
                return
            self.factory.stats.bytesIn += done
            batch = Batch()
            if self._untilTimed:
                batch.received = self._timeThisChunk()
            self._askEngine(operations, None, batch)
        elif self._commands is not _COMMANDS or not self._runPlainLine(data):
            self._receive(data, b"", None)

    def _runPlainLine(self, data: bytes) -> bool:
        """
        Run a chunk that is one plain request (a lowercase verb, single
        spaces, unsigned decimal arguments), as ``_receive`` would; False,
        having done nothing, for any other chunk.

        The pure-Python path's counterpart of the compiled runner, for the
        chunk a client sends without pipelining: on PyPy the ordinary path
        makes the JIT's trace of a request too long to keep whole.
        """
        end = len(data) - 1
        if end > self.factory.maxRequest or data.find(b"\n") != end:
            return False
        tokens = data[:end].split(b" ")
        entry = _PLAIN.get(tokens[0])
        if entry is None or len(tokens) - 1 != entry[0]:
            return False
        # Digits only: then the ordinary path would split the line into
        # these very tokens (no other whitespace, no NUL, no CR).
        if not tokens[1].isdigit() or (len(tokens) == 3 and not tokens[2].isdigit()):
            return False
        batch = Batch()
        if self._untilTimed:
            batch.received = self._timeThisChunk()
        self.factory.stats.bytesIn += len(data)
        batch.replies = entry[1](self, tokens, batch)
        self.resetTimeout()
        self._deliver(batch)
        return True

    def _receive(self, data: bytes, prefix: bytes, carried: Batch | None) -> None:
        """
        The ordinary path, which takes any chunk in any state: after
        ``prefix``, the replies that a run in C gave to the start of the
        chunk, in ``carried``, the batch that the run began.
        """
        if self._closing:
            return
        if self._awaiting:
            # The next chunk waits for the engine's answer to this one, and
            # reading stops until then: what waits is one read at most (and
            # what a TLS transport had decrypted).
            self._backlog.append(data)
            if not self._heldForEngine:
                self._heldForEngine = True
                self._stream.pauseProducing()
            return
        factory = self.factory
        factory.stats.bytesIn += len(data)
        if b"\0" in data:
            data = data.replace(b"\0", b"\n")
        if b"\n" not in data:
            # Still no end of request: keep the piece, copy nothing.
            if self._keepUnfinished(data):
                self._counts[S.TOO_LONG] += 1
                self._closeReason = "too_long"
                self._finish(_carrying(carried, prefix + TOO_LONG))
            elif prefix:
                self._deliver(_carrying(carried, prefix))
            return
        if self._pieces:
            # Each byte is joined once, when its request's end comes.
            self._pieces.append(data)
            buffered = b"".join(self._pieces)
            self._pieces, self._pending = [], 0
        else:
            buffered = data
        if not self._paused:
            # (While paused, a TLS transport still hands over what it had
            # decrypted: that does not stop the clock on unread replies.)
            self._pendingSince = None
        if carried is not None:
            batch = carried
        else:
            batch = Batch()
            # After a prefix from the compiled runner, which samples its
            # own chunks: timing here would file its replies a second time.
            if self._untilTimed and not prefix:
                batch.received = self._timeThisChunk()
        if (self._compiled is not None or self._journaled is not None) and self._commands is _COMMANDS:
            replies, rest = self._runCompiled(buffered, batch)
        else:
            lines = buffered.split(b"\n")
            rest = lines.pop()
            run = self._run if self._commands is not _LOCKED else self._runLocked
            replies = run(lines, _NEEDS_CARE.search(buffered) is not None, batch)
        if prefix:
            replies.insert(0, prefix)
        if rest and not self._closing and self._keepUnfinished(rest):
            replies.append(TOO_LONG)
            self._counts[S.TOO_LONG] += 1
            self._closeReason = "too_long"
            self._closing = True
        self._complete(replies, batch)

    def _timeThisChunk(self) -> float:
        """
        With --metrics, when this chunk was read if it is one to time, else 0.

        Reading the clock twice and filing the figure cost more than a
        whole chunk's work in C, so one chunk in ``TIME_EVERY`` of each
        connection is timed (its first always); the metrics scale the
        histogram to the exact count of requests (kvtwist.server.metrics).
        The chunks that go straight to the compiled runner are not counted
        here: the runner times one in ``TIME_EVERY`` of them itself.
        """
        untilTimed = self._untilTimed
        if untilTimed == 1:
            self._untilTimed = TIME_EVERY
            return time.perf_counter()
        self._untilTimed = untilTimed - 1
        return 0.0

    def _complete(self, replies: list[bytes], batch: Batch) -> None:
        """Deliver a chunk's replies: at once, or once the engine has answered its requests."""
        if self._operations:
            operations, self._operations = self._operations, []
            self._askEngine(operations, replies, batch)
            return
        batch.replies = b"".join(replies)
        if self._closing:
            self._finish(batch)
        elif batch.replies:
            # Blank lines are not activity: only requests keep a connection from idling out.
            self.resetTimeout()
            self._deliver(batch)

    def _deliver(self, batch: Batch) -> None:
        store = self.factory.store
        if store is None:
            # A remote engine's replies wait for nothing more once they are known.
            self.sendReplies(batch)
        else:
            store.deliver(self, batch)

    def _keepUnfinished(self, piece: bytes) -> bool:
        """Hold a piece of a request until its end comes; True (keeping nothing) once it can no longer fit."""
        # A request on its way is activity; its own clock bounds how long it may take.
        self.resetTimeout()
        if not self._pieces:
            self._startRequestClock()
        self._pieces.append(piece)
        self._pending += len(piece)
        if _tooLong(self._pending, piece, self.factory.maxRequest):
            self._pieces, self._pending = [], 0
            self._pendingSince = None
            return True
        return False

    def _runCompiled(self, buffered: bytes, batch: Batch) -> tuple[list[bytes], bytes]:
        """
        ``_run`` for a store that runs requests in C: the common lines of
        the chunk run there without a Python object per request, and each
        line it leaves (anything unusual) runs here, the reference path.
        Returns the replies and the unfinished request after the last LF.
        """
        end = buffered.rfind(b"\n") + 1
        replies, offset = self._runInC(buffered, 0, batch)
        out = [replies]
        careful: bool | None = None
        while offset != end:
            if careful is None:
                careful = _NEEDS_CARE.search(buffered) is not None
            lineEnd = buffered.index(b"\n", offset)
            if self._runLine(buffered[offset:lineEnd], careful, batch, out):
                break
            replies, offset = self._runInC(buffered, lineEnd + 1, batch)
            out.append(replies)
        return out, buffered[end:]

    def _runInC(self, buffered: bytes, start: int, batch: Batch) -> tuple[bytes, int]:
        """The store's ``runChunk`` from ``start``: its replies, and where it stopped."""
        limit, counts = self.factory.maxRequest, self._counts
        if self._compiled is not None:
            return self._compiled.runChunk(buffered, start, limit, counts)
        assert self._journaled is not None, "no store that runs requests in C"
        return self._journaled.runChunk(buffered, start, limit, counts, batch)

    def _runLocked(self, lines: list[bytes], careful: bool, batch: Batch) -> list[bytes]:
        """``_run`` before authentication: one request at a time, as ``auth`` may unlock the rest."""
        out: list[bytes] = []
        for i, line in enumerate(lines):
            if self._runLine(line, careful, batch, out):
                break
            if self._commands is not _LOCKED:
                out += self._run(lines[i + 1 :], careful, batch)
                break
        return out

    def _run(self, lines: list[bytes], careful: bool, batch: Batch) -> list[bytes]:
        """
        Run complete requests in order, noting in ``batch`` what their
        replies wait for; stop at Bye or at a request over the limit.
        The reply lines come back in order; with a remote engine, the
        requests for it are in ``_operations`` and their replies ``_AWAITING``.

        ``careful`` says whether any line holds a CR, VT or FF; most traffic
        has none, and then the fast C-level ``bytes.split`` tokenizes exactly
        as the protocol requires.
        """
        out: list[bytes] = []
        if len(lines) == 1:
            # The common chunk without pipelining, run without entering the
            # loop below. On PyPy, once pipelined chunks have made that loop
            # hot, the JIT compiles it as a loop of its own, and every
            # one-line chunk then pays a way into it and a way out: about a
            # tenth of the throughput (docs/performance.md).
            self._runLine(lines[0], careful, batch, out)
            return out
        for line in lines:
            if self._runLine(line, careful, batch, out):
                break
        return out

    def _runLine(self, line: bytes, careful: bool, batch: Batch, out: list[bytes]) -> bool:
        """Run one request of ``_run``, its reply added to ``out``; True when no request may follow it."""
        if careful and line.endswith(b"\r"):
            line = line[:-1]
        counts = self._counts
        if len(line) > self.factory.maxRequest:
            out.append(TOO_LONG)
            counts[S.TOO_LONG] += 1
            self._closeReason = "too_long"
            self._closing = True
            return True
        tokens = [t for t in _SEPARATORS.split(line) if t] if careful else line.split()
        if not tokens:
            return False
        entry = self._commands.get(tokens[0].lower())
        if entry is None:
            out.append(UNKNOWN)
            counts[S.UNKNOWN_COMMAND] += 1
            return False
        arity, handler, usage = entry
        if len(tokens) - 1 != arity:
            out.append(b"Error: wrong number of arguments (usage: %s)\n" % usage)
            counts[S.WRONG_ARGUMENTS] += 1
            return False
        out.append(handler(self, tokens, batch))
        return self._closing

    # Commands: each gets the request's tokens and returns its reply line.

    def do_put(self, tokens: list[bytes], batch: Batch) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            self._counts[S.PUT_BAD_KEY] += 1
            return _BAD_KEY
        value = parseInt64(tokens[2])
        if value is None:
            self._counts[S.PUT_BAD_VALUE] += 1
            return _BAD_VALUE
        try:
            stored = self._store.put(key, value, batch)
        except StoreError as e:
            return self._storeError("put", e)
        if stored:
            self._counts[S.PUT_OK] += 1
            return OK
        self._counts[S.PUT_EXISTS] += 1
        return EXISTS

    def do_get(self, tokens: list[bytes], batch: Batch) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            self._counts[S.GET_BAD_KEY] += 1
            return _BAD_KEY
        try:
            value = self._store.get(key, batch)
        except StoreError as e:
            return self._storeError("get", e)
        if value is None:
            self._counts[S.GET_NOT_FOUND] += 1
            return NOT_FOUND
        self._counts[S.GET_FOUND] += 1
        return b"%d\n" % value

    def do_del(self, tokens: list[bytes], batch: Batch) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            self._counts[S.DEL_BAD_KEY] += 1
            return _BAD_KEY
        try:
            deleted = self._store.delete(key, batch)
        except StoreError as e:
            return self._storeError("del", e)
        if deleted:
            self._counts[S.DEL_OK] += 1
            return OK
        self._counts[S.DEL_NOT_FOUND] += 1
        return NOT_FOUND

    def _askEngine(self, operations: list[Operation], replies: list[bytes] | None, batch: Batch) -> None:
        """
        Send the chunk's operations to the engine, and hold whatever else
        this connection sends until it has answered. ``replies`` are the
        chunk's reply lines, ``_AWAITING`` where the engine's answers go;
        None when every request of the chunk is one of ``operations``.

        One chunk per connection at the engine keeps the connection's
        replies in order, and bounds what waits for the engine by the
        number of connections: a client that sends more meets TCP's flow
        control (dataReceived stops reading), not a growing queue here. A
        client that waits for its replies, as most do, costs no pause.
        """
        remote = self.factory.remote
        assert remote is not None, "operations without a remote engine"
        self._awaiting = True
        if self.timeOut is not None:
            self.resetTimeout()
        # One callback and its errback: the chunk's whole cost in Deferreds.
        remote.execute(operations).addCallbacks(
            self._engineAnswered, self._engineBroke, callbackArgs=(operations, replies, batch)
        )

    def _engineAnswered(
        self, outcomes: list[Outcome], operations: list[Operation], replies: list[bytes] | None, batch: Batch
    ) -> None:
        try:
            self._answer(outcomes, operations, replies, batch)
        except BaseException:
            # A bug here ends the connection rather than leave it waiting.
            self._engineBroke(Failure())

    def _answer(
        self, outcomes: list[Outcome], operations: list[Operation], replies: list[bytes] | None, batch: Batch
    ) -> None:
        """Send the replies to a chunk the engine has answered, and go on with what waited for them."""
        if len(outcomes) != len(operations):
            raise ValueError(f"the store gave {len(outcomes)} outcomes for {len(operations)} operations")
        self._awaiting = False
        if self._lost:
            return
        if replies is None:
            formatted = None if self._remotePath is None else self._remotePath.formatOutcomes(
                operations, outcomes, self._counts
            )
            if formatted is not None:
                batch.replies = formatted
            else:
                # An error among the outcomes: its text is the Python path's.
                replies = [_AWAITING] * len(operations)
        if replies is not None:
            answers = iter(zip(operations, outcomes))
            for i, reply in enumerate(replies):
                if reply is _AWAITING:
                    operation, outcome = next(answers)
                    replies[i] = self._reply(operation, outcome)
            batch.replies = b"".join(replies)
        last = self._lastBatch
        if last is not None:
            # The connection was ended (a timeout) while the engine worked.
            self._lastBatch = None
            batch.replies += last.replies
        if self._closing:
            self._finish(batch)
            return
        if self.timeOut is not None:
            self.resetTimeout()
        self._write(batch.replies, batch.received)
        if self._heldForEngine:
            self._heldForEngine = False
            if not self._paused:
                self._stream.resumeProducing()
        if self._backlog:
            data = b"".join(self._backlog)
            self._backlog = []
            self.dataReceived(data)
        if self._endOfInput and not self._awaiting:
            self._endOfInput = False
            self.readConnectionLost()

    def _engineBroke(self, failure: Failure) -> None:
        # IRemoteStore promises outcomes, never a failure, and formatting
        # them cannot fail: this is a bug, so the connection ends rather
        # than answer anything untrue.
        self._log.failure("kvstore: the store failed a chunk instead of answering it", failure)
        if not self._lost:
            self._stream.abortConnection()

    def _reply(self, operation: Operation, outcome: Outcome) -> bytes:
        """The reply line for what the engine answered to ``operation``."""
        command = operation.command
        if isinstance(outcome, StoreError):
            return self._storeError(_VERBS[command], outcome)
        if command == GET:
            if outcome is None:
                self._counts[S.GET_NOT_FOUND] += 1
                return NOT_FOUND
            if type(outcome) is not int:
                raise TypeError(f"the store answered get with {outcome!r}")
            self._counts[S.GET_FOUND] += 1
            return b"%d\n" % outcome
        if outcome is not True and outcome is not False:
            raise TypeError(f"the store answered {_VERBS[command]} with {outcome!r}")
        reply, kind = _ANSWERS[command, outcome]
        self._counts[kind] += 1
        return reply

    def do_bye(self, tokens: list[bytes], batch: Batch) -> bytes:
        self._counts[S.BYE] += 1
        self._closeReason = "bye"
        self._closing = True
        return GOODBYE

    def do_auth(self, tokens: list[bytes], batch: Batch) -> bytes:
        password = self.factory.password
        if password is None:
            self._counts[S.AUTH_NO_PASSWORD] += 1
            return NO_PASSWORD
        # Constant time: how much of a guess was right must not show.
        if hmac.compare_digest(tokens[1], password):
            self._commands = self._unlocked
            self._runner = self.factory.runner
            self._chooseDirect()
            self._authFailures = 0
            self._counts[S.AUTH_OK] += 1
            return OK
        self._counts[S.AUTH_INVALID] += 1
        self._authFailures += 1
        if self._authFailures >= AUTH_ATTEMPTS:
            self._closeReason = "auth"
            self._closing = True
        return BAD_PASSWORD

    def refuseUnauthenticated(self, tokens: list[bytes], batch: Batch) -> bytes:
        self._counts[S.AUTH_REQUIRED] += 1
        return AUTH_REQUIRED

    def _storeError(self, command: str, error: StoreError) -> bytes:
        self._counts[S.storeErrorKind(command, error.kind)] += 1
        # The text comes from the server, never from the client, so it is safe to send.
        return b"Error: %s\n" % str(error).encode("ascii", "replace")

    # IReplyTarget: the store hands each batch back when its replies may leave.

    def sendReplies(self, batch: Batch) -> None:
        """
        Write the batch's replies: straight to the socket when nothing is
        queued before them (``kvtwist.server.directsend``), and only what
        the kernel does not take through the transport's queue. TLS and any
        other transport always take the ordinary path.
        """
        if self._lost:
            return
        self._write(batch.replies, batch.received)
        if batch.last:
            # Flow control is over: reading resumes (what comes in is
            # ignored), so that a TLS close can read the peer's close_notify,
            # and a transport with a paused producer registered would wait
            # for it forever instead of closing.
            self._stream.resumeProducing()
            self._stream.unregisterProducer()
            self._stream.loseConnection()
            # A client that never reads would hold the connection while
            # the last replies wait to be flushed (and a TLS peer that never
            # answers the close, for good): after a grace period, abort.
            self._abort = self.callLater(CLOSE_GRACE, self._stream.abortConnection)

    def _write(self, replies: bytes, received: float) -> None:
        """Send replies to requests read at ``received`` (0: not timed)."""
        if received:
            self.factory.stats.latency.observe(time.perf_counter() - received, replies.count(b"\n"))
        if replies:
            self.factory.stats.bytesOut += len(replies)
            replies = sendNow(self.transport, replies)
            if replies:
                self._stream.write(replies)

    def abandonReplies(self) -> None:
        self._stream.abortConnection()

    def _finish(self, batch: Batch) -> None:
        """Send the last replies, then close once they are flushed."""
        self._closing = True
        self.setTimeout(None)
        if self._awaiting:
            # They follow the replies the engine has yet to give.
            self._lastBatch = batch
            return
        # Not pausing the transport: input is ignored from here on, and a
        # TLS close must still read the peer's close_notify.
        batch.last = True
        self._deliver(batch)


# verb -> (number of arguments, handler, usage): one table for every
# connection, and adding a command is one row.
_Command = tuple[int, Callable[[KVProtocol, list[bytes], Batch], bytes], bytes]
_COMMANDS: dict[bytes, _Command] = {
    b"put": (2, KVProtocol.do_put, b"put KEY VALUE"),
    b"get": (1, KVProtocol.do_get, b"get KEY"),
    b"del": (1, KVProtocol.do_del, b"del KEY"),
    b"bye": (0, KVProtocol.do_bye, b"Bye"),
    b"auth": (1, KVProtocol.do_auth, b"auth PASSWORD"),
}


def _queueFor(command: int, badKey: int, badValue: int = -1) -> Callable[[KVProtocol, list[bytes], Batch], bytes]:
    """
    The handler of a data command with a remote engine: it checks the
    request's integers, as in memory, then queues the operation for the
    engine with the rest of the chunk (``KVProtocol._askEngine``).
    """

    def queue(protocol: KVProtocol, tokens: list[bytes], batch: Batch) -> bytes:
        key = parseInt64(tokens[1])
        if key is None:
            protocol._counts[badKey] += 1
            return _BAD_KEY
        value = 0
        if command == PUT:
            parsed = parseInt64(tokens[2])
            if parsed is None:
                protocol._counts[badValue] += 1
                return _BAD_VALUE
            value = parsed
        protocol._operations.append(Operation(command, key, value))
        return _AWAITING

    return queue


# The commands ``_runPlainLine`` takes, as ``_COMMANDS`` has them.
_PLAIN = {verb: _COMMANDS[verb] for verb in (b"put", b"get", b"del")}

_REMOTE_COMMANDS: dict[bytes, _Command] = {
    **_COMMANDS,
    b"put": (2, _queueFor(PUT, S.PUT_BAD_KEY, S.PUT_BAD_VALUE), b"put KEY VALUE"),
    b"get": (1, _queueFor(GET, S.GET_BAD_KEY), b"get KEY"),
    b"del": (1, _queueFor(DELETE, S.DEL_BAD_KEY), b"del KEY"),
}
_VERBS = {PUT: "put", GET: "get", DELETE: "del"}
# (command, what the engine answered) -> (reply, outcome counted), for put and del.
_ANSWERS = {
    (PUT, True): (OK, S.PUT_OK), (PUT, False): (EXISTS, S.PUT_EXISTS),
    (DELETE, True): (OK, S.DEL_OK), (DELETE, False): (NOT_FOUND, S.DEL_NOT_FOUND),
}
# The table of a connection that has not authenticated yet: the data
# commands answer that authentication is required, and nothing else
# changes, so locking costs nothing per request.
_LOCKED: dict[bytes, _Command] = {
    verb: (arity, KVProtocol.refuseUnauthenticated if verb in (b"put", b"get", b"del") else handler, usage)
    for verb, (arity, handler, usage) in _COMMANDS.items()
}


# What each of the server's reasons to end a connection means, for --log-connections.
_CLOSE_REASONS = {
    None: "by the client",
    "client": "the client ended its input",
    "bye": "Bye",
    "too_long": "request too long",
    "idle": "idle timeout",
    "request_timeout": "request timeout",
    "auth": "too many wrong passwords",
}


def _carrying(carried: Batch | None, replies: bytes) -> Batch:
    """The batch that carries ``replies``: the one a run in C began (with what they depend on), or a new one."""
    batch = Batch() if carried is None else carried
    batch.replies = replies
    return batch


def _peer(transport: object) -> str:
    """The client's address as a log shows it."""
    getPeer = getattr(transport, "getPeer", None)
    address = getPeer() if getPeer is not None else None
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def _tooLong(size: int, last: bytes, limit: int) -> bool:
    """Whether an unfinished request of ``size`` bytes, ending in ``last``, can no longer fit.

    A CR before the LF does not count against the limit.
    """
    return size > limit and not (size == limit + 1 and last.endswith(b"\r"))

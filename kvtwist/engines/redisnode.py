"""
The connection layer to one Redis server, shared by the Redis and the Redis
Cluster engines.

A ``RedisNode`` keeps a small pool of connections (``options.connections``)
to one server, shared by every client connection of the kvtwist node, and
pipelines each ``send`` on one of them in one write. It reconnects with
backoff on its own, fails fast while the server is known to be down, and
answers every send within ``options.timeout``: a send's Deferred never
fails, each command's result says what became of it.

The sends of one reactor turn are written together at its end, on one
connection, straight to the socket when nothing is queued before them
(``kvtwist.server.directsend``); their timeout is one clock per node, not
one timer per send. Under load a turn's sends cost one system call, one
reply to read, and no timer.

The reconnect loop is our own rather than ``ClientService``: a connection
is usable only once AUTH and SELECT (or a PING) have been answered, and a
``ClientService`` whose ``prepareConnection`` fails leaves that connection
open, while closing it raises in the service's state machine.
"""

from __future__ import annotations

import random
from collections import deque
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Callable, Sequence, TypeVar

import hiredis
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvtwist.engines import EngineOptions
from kvtwist.server.directsend import sendNow
from kvtwist.storage.interface import OUTCOME_UNKNOWN, OVERLOADED, TIMED_OUT, EngineStats, StoreUnavailable

# Reconnect delays: the first retry after a failure comes at once, then they
# double up to the ceiling, so a node finds a restarted server within about
# a second while costing a down server a few connects a second.
_FIRST_RETRY = 0.05
_MAX_RETRY = 1.0
# A connection that lived less than this before it dropped counts as a
# failed attempt, so a server that accepts and hangs up is not hammered.
_SHORT_LIVED = 1.0
# A send this close to its deadline when the clock runs counts as late, so
# that float rounding of the timer's time never costs an extra reactor turn.
_SLACK = 1e-6

log = Logger()

_T = TypeVar("_T")


class ReplyError(Exception):
    """An error reply from Redis (-ERR ..., -MOVED 3999 127.0.0.1:6381, -ASK ..., -TRYAGAIN ...); str() is the reply text without the '-'."""


class _HandshakeError(Exception):
    """The server refused AUTH, SELECT or PING: the connection is not usable."""


def encodeCommands(commands: Sequence[Sequence[bytes]]) -> bytes:
    """``commands`` as RESP arrays of bulk strings, back to back: one write for a whole pipeline."""
    parts = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for argument in command:
            parts.append(b"$%d\r\n%b\r\n" % (len(argument), argument))
    return b"".join(parts)


def describeFailure(failure: Failure) -> str:
    """A short reason for a failed connection, for the log line, the error counts and the client's reply."""
    value = failure.value
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError)):
        return "connect timed out"
    if isinstance(value, error.NoRouteError):
        return "no route to host"
    if isinstance(value, error.DNSLookupError):
        return "host not found"
    if isinstance(value, (error.ConnectionDone, error.ConnectionLost)):
        return "connection lost"
    if isinstance(value, _HandshakeError):
        return str(value)
    if type(value).__module__.startswith("OpenSSL"):
        return f"TLS failed: {value}".splitlines()[0]
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__


def asIs(results: list[object]) -> list[object]:
    """The ``decode`` of a send whose caller takes the results as they are."""
    return results


class _Send:
    """One ``send``: its commands' results so far, and the Deferred that delivers all of them, decoded."""

    __slots__ = ("size", "results", "received", "deferred", "decode", "started", "written", "done")

    def __init__(self, size: int, decode: Callable[[list[object]], Any], started: float) -> None:
        self.size = size
        self.results: list[object] = []
        # Replies consumed from the connection, including any after the timeout.
        self.received = 0
        self.deferred: Deferred[Any] = Deferred()
        self.decode = decode
        self.started = started
        self.written = 0.0
        self.done = False


class _Handshake:
    """AUTH/SELECT/PING on a new connection; fires once all were answered well."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self.deferred: Deferred[None] = Deferred()
        self.failed: str | None = None


class _RedisProtocol(Protocol):
    """
    One connection to the server: writes pipelines, hands each reply to the
    send it answers, in order.
    """

    def __init__(self, node: RedisNode) -> None:
        self._node = node
        self._reader = hiredis.Reader(replyError=ReplyError)
        # The sends (and the handshake) whose replies are still to come, oldest first.
        self.queue: deque[Any] = deque()
        # Commands written and not yet answered, for picking the least busy connection.
        self.outstanding = 0
        self.lastReceived = 0.0
        self.ready = False
        self.closed: Deferred[None] = Deferred()
        self._handshake: _Handshake | None = None
        self._handshakeTimer: IDelayedCall | None = None
        self._lost = False
        # Pipelines accepted in this reactor turn, written together at its end.
        self.unsent: list[bytes] | None = None

    def connectionMade(self) -> None:
        self._node._protocols.add(self)
        for transport in (self.transport, getattr(self.transport, "transport", None)):
            setNoDelay = getattr(transport, "setTcpNoDelay", None)
            if setNoDelay is not None:
                setNoDelay(True)
                break

    def handshake(self, commands: list[list[bytes]], timeout: float) -> Deferred[None]:
        """Send AUTH/SELECT/PING; fire when answered, fail (and close) when refused or late."""
        handshake = _Handshake(len(commands))
        self._handshake = handshake
        self.queue.append(handshake)
        self.outstanding += len(commands)
        assert self.transport is not None
        self.transport.write(encodeCommands(commands))
        self._handshakeTimer = self._node._reactor.callLater(timeout, self._handshakeFailed, "handshake timed out")
        handshake.deferred.addBoth(self._handshakeEnded)
        return handshake.deferred

    def _handshakeEnded(self, result: object) -> object:
        self._handshake = None
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None
        return result

    def _handshakeFailed(self, reason: str) -> None:
        handshake = self._handshake
        if handshake is not None and not handshake.deferred.called:
            handshake.deferred.errback(_HandshakeError(reason))
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        node = self._node
        self.lastReceived = node._reactor.seconds()
        reader = self._reader
        reader.feed(data)
        gets = reader.gets
        queue = self.queue
        try:
            while True:
                if not queue:
                    if reader.has_data():
                        log.error("kvstore: store {address} sent a reply nobody asked for; reconnecting", address=node.label)
                        self.transport.abortConnection()  # type: ignore[union-attr]
                    return
                waiter = queue[0]
                if type(waiter) is not _Send:
                    reply = gets()
                    if reply is False:
                        return
                    waiter.received += 1
                    self.outstanding -= 1
                    if waiter.received == waiter.size:
                        queue.popleft()
                    self._handshakeReply(waiter, reply)
                    continue
                # A send's replies, as many as have come, in one tight loop.
                # A send that is done (timed out) still takes its replies,
                # into a list nobody reads any more.
                results = waiter.results
                received = waiter.received
                size = waiter.size
                before = received
                while received < size:
                    reply = gets()
                    if reply is False:
                        break
                    results.append(reply)
                    received += 1
                got = received - before
                waiter.received = received
                self.outstanding -= got
                node._pending -= got
                if received < size:
                    return
                queue.popleft()
                if not waiter.done:
                    node._finish(waiter, None)
        except hiredis.ProtocolError as e:
            log.error("kvstore: store {address} sent something that is not RESP ({error}); reconnecting", address=node.label, error=e)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _handshakeReply(self, handshake: _Handshake, reply: object) -> None:
        if isinstance(reply, ReplyError) and handshake.failed is None:
            handshake.failed = f"refused the connection: {reply}"
        if handshake.received == handshake.size and not handshake.deferred.called:
            if handshake.failed is None:
                handshake.deferred.callback(None)
            else:
                self._handshakeFailed(handshake.failed)

    def flush(self) -> None:
        """Write what this turn's sends queued, in one system call when the kernel takes it all."""
        unsent, self.unsent = self.unsent, None
        if self._node._corked is self:
            self._node._corked = None
        transport = self.transport
        if unsent and not self._lost and transport is not None:
            rest = sendNow(transport, b"".join(unsent))
            if rest:
                transport.write(rest)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self._lost = True
        self.unsent = None
        if self._node._corked is self:
            self._node._corked = None
        node = self._node
        node._protocols.discard(self)
        if self._handshake is not None and not self._handshake.deferred.called:
            self._handshake.deferred.errback(reason)
        # The pool forgets this connection before any caller hears of it,
        # so that nothing is sent on it from a callback below.
        if self.ready:
            self.ready = False
            node._connectionLost(self, reason)
        queue, self.queue = self.queue, deque()
        self.outstanding = 0
        for waiter in queue:
            if type(waiter) is _Send:
                node._pending -= waiter.size - waiter.received
        for waiter in queue:
            if type(waiter) is _Send and not waiter.done:
                node._finish(waiter, OUTCOME_UNKNOWN)
        self.closed.callback(None)


class _Factory(Factory):
    # Connections come and go with the server; the log says so once per outage instead.
    noisy = False

    def __init__(self, node: RedisNode) -> None:
        self._node = node

    def buildProtocol(self, addr: object) -> _RedisProtocol:
        return _RedisProtocol(self._node)


class _Slot:
    """One place in the pool: a connection, or the attempt to make one, or the wait before the next attempt."""

    def __init__(self, node: RedisNode) -> None:
        self.node = node
        self.protocol: _RedisProtocol | None = None
        self.attempt: Deferred[_RedisProtocol] | None = None
        self.retry: IDelayedCall | None = None
        self.failures = 0
        self.readyAt = 0.0

    def connect(self) -> None:
        self.retry = None
        node = self.node
        attempt: Deferred[Any] = node._endpoint.connect(node._factory)
        self.attempt = attempt
        attempt.addCallback(self._handshake)
        attempt.addCallbacks(self._connected, self._failed)

    def _handshake(self, protocol: _RedisProtocol) -> Deferred[_RedisProtocol]:
        d = protocol.handshake(self.node._handshakeCommands, self.node._options.timeout)
        return d.addCallback(lambda _: protocol)

    def _connected(self, protocol: _RedisProtocol) -> None:
        self.attempt = None
        if not self.node.running:
            # Stopped while the handshake was answered: stopService closes it.
            return
        self.failures = 0
        self.protocol = protocol
        self.readyAt = self.node._reactor.seconds()
        protocol.ready = True
        self.node._connectionReady(protocol)

    def _failed(self, failure: Failure) -> None:
        self.attempt = None
        if not self.node.running:
            return
        self.failures += 1
        self._scheduleRetry()
        self.node._attemptFailed(describeFailure(failure))

    def lost(self) -> None:
        self.protocol = None
        if not self.node.running:
            return
        if self.node._reactor.seconds() - self.readyAt < _SHORT_LIVED:
            self.failures += 1
        self._scheduleRetry()

    def _scheduleRetry(self) -> None:
        delay = 0.0
        if self.failures > 1:
            delay = min(_MAX_RETRY, _FIRST_RETRY * 2 ** (self.failures - 2)) * (0.5 + random.random() / 2)
        self.retry = self.node._reactor.callLater(delay, self.connect)

    def stop(self) -> None:
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None
        if self.attempt is not None:
            self.attempt.cancel()


def _endpointFor(host: str, port: int, timeout: float, reactor: Any, tlsOptions: object | None) -> IStreamClientEndpoint:
    try:
        address = ip_address(host)
    except ValueError:
        address = None
    endpoint: IStreamClientEndpoint
    if isinstance(address, IPv4Address):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isinstance(address, IPv6Address):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tlsOptions is not None:
        endpoint = wrapClientTLS(tlsOptions, endpoint)  # type: ignore[arg-type]
    return endpoint


class RedisNode(Service):
    """
    A bounded pool of connections to one Redis server, with pipelined sends.

    It records in ``stats`` the round trip of each answered send
    (``latency``) and, while the server is down, why (``unavailable``).
    Operations and errors are counted by the engine, which knows which
    commands are operations.
    """

    def __init__(
        self,
        host: str,
        port: int,
        options: EngineOptions,
        reactor: Any,
        stats: EngineStats,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tlsOptions: object | None = None,
    ) -> None:
        if not options.timeout > 0:
            raise ValueError(f"a Redis node needs a timeout of more than 0 seconds, not {options.timeout}")
        self.address = f"{host}:{port}"
        # How the log names this server.
        bracketed = f"[{host}]" if ":" in host else host
        self.label = f"{'rediss' if tlsOptions is not None else 'redis'}://{bracketed}:{port}"
        self._options = options
        self._reactor = reactor
        self._stats = stats
        self._endpoint = _endpointFor(host, port, options.timeout, reactor, tlsOptions)
        self._factory = _Factory(self)
        handshake: list[list[bytes]] = []
        if password is not None:
            credentials = [password.encode()] if username is None else [username.encode(), password.encode()]
            handshake.append([b"AUTH", *credentials])
        if db:
            handshake.append([b"SELECT", b"%d" % db])
        # A PING proves a connection answers (and that TLS verified) before it is used.
        self._handshakeCommands = handshake or [[b"PING"]]
        self._slots = [_Slot(self) for _ in range(max(1, options.connections))]
        self._protocols: set[_RedisProtocol] = set()
        self._ready: list[_RedisProtocol] = []
        # Sends accepted while no connection was ready, oldest first, with their encoded commands.
        self._waiting: deque[tuple[_Send, bytes]] = deque()
        # The one timer that fails late sends: armed for the oldest live
        # send's deadline, moved on only when it fires.
        self._clock: IDelayedCall | None = None
        # The connection whose writes wait for the end of this reactor turn:
        # later sends in the turn join them, so that one write and one
        # reply carry them all.
        self._corked: _RedisProtocol | None = None
        # Commands accepted and not yet answered (or given up on).
        self._pending = 0
        # Sends whose Deferred has not fired, for a stop that lets them finish.
        self._live = 0
        self._drained: list[Deferred[None]] = []
        # Why the last connection attempt failed, while no connection is ready.
        self._failure: str | None = None
        self._loggedOutage = False

    @property
    def unavailable(self) -> str | None:
        """Why no connection is usable now (None while one is)."""
        if self._ready:
            return None
        if not self.running:
            return "not connected"
        return self._failure or "connecting"

    def startService(self) -> None:
        super().startService()
        self._failure = None
        for slot in self._slots:
            slot.connect()

    def stopService(self) -> Deferred[None]:
        """Refuse new sends, let those under way finish (within the timeout), then close every connection."""
        super().stopService()
        self._failWaiting("store is stopping")
        drained: Deferred[None] = Deferred()
        if self._live:
            self._drained.append(drained)
        else:
            drained.callback(None)
        return drained.addCallback(lambda _: self._closeAll())

    def _closeAll(self) -> Deferred[None]:
        if self._clock is not None and self._clock.active():
            self._clock.cancel()
        self._clock = None
        for slot in self._slots:
            slot.stop()
        protocols = list(self._protocols)
        closing = [protocol.closed for protocol in protocols]
        for protocol in protocols:
            # Every send has fired by now, so nothing still buffered for the
            # server matters, and a server that stopped reading cannot hold up the stop.
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        return DeferredList(closing).addCallback(lambda _: None)

    def send(self, commands: Sequence[Sequence[bytes]]) -> Deferred[list[object]]:
        """
        Pipeline ``commands`` back to back on ONE of the node's connections (so ASKING + a command stay adjacent), in one write.

        Fires, never fails, within options.timeout, with one result per
        command: the decoded reply (bytes, int, None, list), a ReplyError
        for an error reply, or a StoreUnavailable:
        StoreUnavailable(OUTCOME_UNKNOWN) or StoreUnavailable(TIMED_OUT)
        for a command that was written but whose answer never came;
        StoreUnavailable(<reason, e.g. 'connection refused'>) for one never
        written; StoreUnavailable(OVERLOADED) when more than
        options.maxPending commands are already waiting on this node.
        """
        return self.sendEncoded(encodeCommands(commands), len(commands), asIs)

    def sendEncoded(self, pipeline: bytes, size: int, decode: Callable[[list[object]], _T]) -> Deferred[_T]:
        """
        ``send`` for commands already encoded: ``pipeline`` is ``size``
        complete RESP commands back to back, as ``encodeCommands`` makes
        them. The Deferred fires with ``decode(results)`` instead of the
        results (``asIs`` for the results themselves), so that a caller that
        turns replies into answers needs no callback of its own; it fails
        only if ``decode`` raises.
        """
        if not size:
            return self._decoded([], decode)
        if not self.running:
            return self._decoded([StoreUnavailable("store is not running")] * size, decode)
        if self._pending + size > self._options.maxPending:
            return self._decoded([StoreUnavailable(OVERLOADED)] * size, decode)
        ready = self._ready
        if not ready and self._failure is not None:
            return self._decoded([StoreUnavailable(self._failure)] * size, decode)
        send = _Send(size, decode, self._reactor.seconds())
        self._pending += size
        self._live += 1
        if self._clock is None:
            self._clock = self._reactor.callLater(self._options.timeout, self._tick)
        if ready:
            self._write(send, pipeline, self._corked or self._leastBusy())
        else:
            self._waiting.append((send, pipeline))
        return send.deferred

    @staticmethod
    def _decoded(results: list[object], decode: Callable[[list[object]], _T]) -> Deferred[_T]:
        """A send answered at once, without reaching the server."""
        d: Deferred[_T] = Deferred()
        _fire(d, decode, results)
        return d

    def _leastBusy(self) -> _RedisProtocol:
        ready = self._ready
        best = ready[0]
        if len(ready) > 1:
            for protocol in ready:
                if protocol.outstanding < best.outstanding:
                    best = protocol
        return best

    def _write(self, send: _Send, pipeline: bytes, protocol: _RedisProtocol) -> None:
        """Queue ``send`` for ``protocol``'s replies and write it, at once if nothing is queued before it."""
        send.written = self._reactor.seconds()
        protocol.queue.append(send)
        protocol.outstanding += send.size
        unsent = protocol.unsent
        if unsent is None:
            protocol.unsent = [pipeline]
            self._corked = protocol
            self._reactor.callLater(0, protocol.flush)
        else:
            unsent.append(pipeline)

    def _finish(self, send: _Send, failure: str | None) -> None:
        """Fire ``send`` with its replies, the rest of its commands failing with ``failure``."""
        send.done = True
        results = send.results
        if failure is None:
            self._stats.latency.observe(self._reactor.seconds() - send.started)
        else:
            results = results + [StoreUnavailable(failure)] * (send.size - len(results))
        send.results = []
        self._live -= 1
        _fire(send.deferred, send.decode, results)
        if not self._live and self._drained:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def _tick(self) -> None:
        """
        The node's clock: fail every send older than the timeout, then wait
        for the deadline of the oldest one left (or for the next send).

        Each connection answers its sends in the order they were written,
        and sends are written in the order they came, so each queue is
        sorted by age: only its late head needs looking at.
        """
        self._clock = None
        reactor = self._reactor
        timeout = self._options.timeout
        late = reactor.seconds() - timeout + _SLACK
        oldest: float | None = None
        if self._waiting:
            waiting = self._waiting
            while waiting and waiting[0][0].started <= late:
                send = waiting.popleft()[0]
                self._pending -= send.size
                self._finish(send, self._failure or "no connection within the timeout")
            if waiting:
                oldest = waiting[0][0].started
        for protocol in list(self._ready):
            stuck = False
            for send in list(protocol.queue):
                if type(send) is not _Send or send.done:
                    continue
                if send.started > late:
                    if oldest is None or send.started < oldest:
                        oldest = send.started
                    break
                self._finish(send, TIMED_OUT)
                # Not one reply on this connection for a whole timeout while a
                # pipeline waited: the server or the path to it is gone.
                # Closing it bounds what waits on it, and makes the pool reconnect.
                stuck = stuck or protocol.lastReceived < send.written
            if stuck and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        if oldest is not None:
            # A send made by a callback above may have armed the clock, for later.
            due = oldest + timeout
            clock = self._clock
            if clock is None or clock.getTime() > due:
                if clock is not None:
                    clock.cancel()
                self._clock = reactor.callLater(max(0.0, due - reactor.seconds()), self._tick)

    def _failWaiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, deque()
        for send, _ in waiting:
            self._pending -= send.size
            self._finish(send, reason)

    def _connectionReady(self, protocol: _RedisProtocol) -> None:
        self._ready.append(protocol)
        self._failure = None
        if self._loggedOutage:
            self._loggedOutage = False
            log.info("kvstore: store {label} available again", label=self.label)
            if self._stats.unavailable is not None and self._stats.unavailable.startswith(self.label):
                self._stats.unavailable = None
        waiting, self._waiting = self._waiting, deque()
        for send, pipeline in waiting:
            self._write(send, pipeline, self._leastBusy())

    def _connectionLost(self, protocol: _RedisProtocol, reason: Failure) -> None:
        self._ready.remove(protocol)
        for slot in self._slots:
            if slot.protocol is protocol:
                slot.lost()

    def _attemptFailed(self, reason: str) -> None:
        if self._ready:
            return
        self._failure = reason
        if not self._loggedOutage:
            self._loggedOutage = True
            log.warn("kvstore: store {label} unavailable: {reason}", label=self.label, reason=reason)
            self._stats.unavailable = f"{self.label}: {reason}"
        # Last: the sends' callbacks may run a caller that looks at the state above.
        self._failWaiting(reason)



def _fire(d: Deferred[_T], decode: Callable[[list[object]], _T], results: list[object]) -> None:
    """Fire ``d`` with ``decode(results)``, or with the failure if decode raises."""
    try:
        decoded = decode(results)
    except BaseException:
        d.errback(Failure())
    else:
        d.callback(decoded)

"""
The etcd engine: kvtwist nodes that keep their data in an etcd cluster.

etcd replicates with Raft and answers linearizably, so many nodes can share
one store that survives the loss of a minority of its members. The engine
talks to etcd's v3 JSON gateway over HTTP/1.1 with treq. Every request is
one atomic etcd operation on the key ``keyPrefix + decimal key``:

- ``put`` is a transaction that puts only if the key's ``create_revision``
  is 0 (the key is absent), so put-if-absent holds across nodes;
- ``get`` is a linearizable range (never a serializable one, which could
  read a stale member);
- ``del`` is a deleterange, which says how many keys it removed.

The gateway does not pipeline, so a chunk's operations go out at once on
several connections, except that operations on one key wait for each other
to keep their order. The whole node shares at most ``options.connections``
requests in flight per member.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from typing import Any

from treq.client import HTTPClient
from treq.content import content
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from kvtwist.engines import EngineOptions, EngineURLError
from kvtwist.storage.interface import (
    DELETE,
    GET,
    OUTCOME_UNKNOWN,
    OVERLOADED,
    PUT,
    TIMED_OUT,
    EngineStats,
    Operation,
    Outcome,
    StoreError,
    StoreUnavailable,
)

# Why a read failed when every member dropped its connection mid-request.
CONNECTION_LOST = "connection lost"

# etcd's client port, for a member given without one.
DEFAULT_PORT = 2379

_URL_FORM = "etcd://HOST:PORT[,HOST:PORT...]"

# The gateway's path for each command.
_PATHS = {PUT: b"/v3/kv/txn", GET: b"/v3/kv/range", DELETE: b"/v3/kv/deleterange"}

# What kvtwist writes, and so the only stored values it reads back as integers.
_CANONICAL = re.compile(rb"(?:0|-?[1-9][0-9]{0,18})\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# gRPC statuses (in the gateway's error body) that mean "this member cannot
# serve now": Unavailable ("no leader") and DeadlineExceeded ("request timed out").
_UNAVAILABLE_CODES = {4, 14}


def parseMembers(url: str) -> list[tuple[str, int]]:
    """The (host, port) of each member an ``etcd://`` URL lists; ``EngineURLError`` says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if scheme != "etcd" or not sep:
        raise EngineURLError(f"{url!r}: expected {_URL_FORM}")
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(char in rest for char in "/?#@"):
        raise EngineURLError(f"{url!r}: an etcd URL lists members only, as {_URL_FORM}")
    members: list[tuple[str, int]] = []
    for part in rest.split(","):
        member = _parseMember(url, part.strip())
        if member in members:
            raise EngineURLError(f"{url!r}: member {part.strip()} is listed twice")
        members.append(member)
    return members


def _parseMember(url: str, part: str) -> tuple[str, int]:
    if part.startswith("["):
        host, bracket, after = part[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise EngineURLError(f"{url!r}: {part!r} is not [IPV6]:PORT; expected {_URL_FORM}")
        portText = after[1:] if after else ""
    else:
        host, colon, portText = part.partition(":")
        if ":" in portText:
            raise EngineURLError(f"{url!r}: write an IPv6 member in brackets, as [{part}]:{DEFAULT_PORT}")
        if colon and not portText:
            raise EngineURLError(f"{url!r}: member {part!r} has no port after the colon")
    if not host:
        raise EngineURLError(f"{url!r}: a member has no host; expected {_URL_FORM}")
    if not host.isascii() or any(char.isspace() for char in host):
        raise EngineURLError(f"{url!r}: {host!r} is not a host name or address")
    if not portText:
        return host, DEFAULT_PORT
    if not (portText.isascii() and portText.isdigit()) or not 0 < int(portText) < 65536:
        raise EngineURLError(f"{url!r}: {portText!r} is not a port (1-65535)")
    return host, int(portText)


def fromURL(url: str, options: EngineOptions, reactor: Any) -> EtcdStore:
    """The engine for an ``etcd://`` URL (``kvtwist.engines.openEngine`` calls this)."""
    return EtcdStore(url, parseMembers(url), options, reactor)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _requestBody(command: int, key: bytes, value: int) -> bytes:
    """The gateway's JSON for one operation (built by hand: it is the hot path)."""
    k = _b64(key)
    if command != PUT:
        return b'{"key":"%s"}' % k
    return (
        b'{"compare":[{"key":"%s","target":"CREATE","result":"EQUAL","create_revision":"0"}],'
        b'"success":[{"request_put":{"key":"%s","value":"%s"}}]}' % (k, k, _b64(b"%d" % value))
    )


def _storedValue(key: int, raw: bytes) -> int | StoreError:
    """A stored value as kvtwist wrote it, or the StoreError a client sees for anything else."""
    if _CANONICAL.match(raw):
        number = int(raw)
        if _INT64_MIN <= number <= _INT64_MAX:
            return number
    shown = raw[:40].decode("utf-8", "replace")
    return StoreError(f"the value etcd holds for key {key} is not a 64-bit integer: {shown!r}")


def _outcome(command: int, key: int, reply: dict[str, Any]) -> Outcome:
    """What a 200 reply of the gateway means (proto3 JSON leaves out false, zero and empty fields)."""
    if command == PUT:
        return bool(reply.get("succeeded", False))
    if command == DELETE:
        return int(reply.get("deleted", 0)) > 0
    kvs = reply.get("kvs")
    if not kvs:
        return None
    return _storedValue(key, base64.b64decode(kvs[0].get("value", "")))


@implementer(IBodyProducer)
class _BytesBody:
    """A request body written at once (treq's default producer writes it on a later turn of the reactor)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data) if data else UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Call:
    """One operation of a chunk on its way through the engine."""

    __slots__ = ("chunk", "index", "command", "key", "path", "body", "waiting", "sent", "tried", "done", "follower")

    def __init__(self, chunk: _Chunk, index: int, operation: Operation, keyPrefix: bytes) -> None:
        self.chunk = chunk
        self.index = index
        self.command = operation.command
        self.key = operation.key
        self.path = _PATHS[operation.command]
        self.body = _requestBody(operation.command, keyPrefix + b"%d" % operation.key, operation.value)
        # The Deferred to cancel when time runs out: a connection slot, or the request.
        self.waiting: Deferred[Any] | None = None
        # Whether the request got a connection, and so may have reached etcd.
        self.sent = False
        self.tried = 0
        self.done = False
        # The next operation of the chunk on the same key, started when this one is done.
        self.follower: _Call | None = None


class _Chunk:
    """The operations of one ``execute`` and the Deferred of their outcomes."""

    __slots__ = ("outcomes", "remaining", "deferred", "timer", "calls", "started", "expired")

    def __init__(self, count: int, started: float) -> None:
        self.outcomes: list[Outcome] = [None] * count
        self.remaining = count
        self.deferred: Deferred[list[Outcome]] = Deferred()
        self.timer: IDelayedCall | None = None
        self.calls: list[_Call] = []
        self.started = started
        self.expired = False


class _QuietFactory(_HTTP11ClientFactory):
    # Twisted logs every connection's factory start and stop; a node's log
    # should not grow with its traffic.
    noisy = False


@implementer(IAgentEndpointFactory)
class _MemberEndpoints:
    """
    Plain TCP endpoints for members given by address.

    The Agent's default (HostnameEndpoint) resolves even an address in a
    thread and waits between attempts, which makes a refused member cost
    a third of a second instead of nothing.
    """

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        self._reactor = reactor
        self._timeout = connectTimeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)


class _TellingPool(HTTPConnectionPool):
    """
    A connection pool that tells a request when it gets its connection.

    A write whose request never got a connection surely did not happen
    (``TIMED_OUT``, or try the next member); one that did may have
    (``OUTCOME_UNKNOWN``). The error types alone cannot tell these apart.
    """

    _factory = _QuietFactory

    # The call whose request the Agent is about to ask a connection for.
    nextCall: _Call | None = None

    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        call, self.nextCall = self.nextCall, None
        connection = super().getConnection(key, endpoint)
        if call is not None:
            # Added before the Agent's own callback, which writes the request.
            connection.addCallback(_connected, call)
        return connection


def _connected(connection: Any, call: _Call) -> Any:
    call.sent = True
    return connection


def _readReply(response: IResponse) -> Deferred[tuple[int, bytes]]:
    return content(response).addCallback(lambda body: (response.code, body))


def _connectReason(failure: Failure) -> str:
    """Why no member took a connection: a short fixed text, since the metrics count failures by reason."""
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(DNSLookupError):
        return "cannot resolve the etcd host"
    return "cannot connect"


def _errorMessage(body: bytes) -> tuple[str, int | None]:
    """The message and gRPC code of a gateway error reply (any body, even one that is not JSON)."""
    try:
        reply = json.loads(body)
        return str(reply.get("message") or reply.get("error")), int(reply.get("code"))
    except (ValueError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip(), None


class EtcdStore(Service):
    """
    An ``IRemoteStore`` in an etcd cluster, and the service that owns its connections.

    Members are tried in turn (a failover list) starting with the one that
    answered last; a member that refuses connections is skipped, and a
    member that does not answer in time is left for the next one.
    """

    _log = Logger()

    def __init__(self, url: str, members: list[tuple[str, int]], options: EngineOptions, reactor: Any) -> None:
        self.stats = EngineStats()
        self._url = url
        self._options = options
        self._reactor = reactor
        self._keyPrefix = options.keyPrefix.encode("utf-8")
        self._urls = [
            {command: b"http://%s%s" % (_hostPort(host, port), path) for command, path in _PATHS.items()}
            for host, port in members
        ]
        self._pool = _TellingPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = options.connections
        self._pool.retryAutomatically = False
        self._client = HTTPClient(
            Agent.usingEndpointFactory(reactor, _MemberEndpoints(reactor, options.timeout), pool=self._pool),
            data_to_body_producer=_BytesBody,
        )
        self._slots = [DeferredSemaphore(options.connections) for _ in members]
        # The member that answered last: the first one tried.
        self._current = 0
        # Operations sent or waiting, against options.maxPending.
        self._pending = 0

    def describe(self) -> str:
        return self._url

    def stopService(self) -> Deferred[None]:
        """Close the idle connections; the Deferred fires once they are closed."""
        super().stopService()
        return self._pool.closeCachedConnections()

    def execute(self, operations: Sequence[Operation]) -> Deferred[list[Outcome]]:
        count = len(operations)
        if not count:
            return succeed([])
        if self._pending + count > self._options.maxPending:
            self.stats.failed(OVERLOADED, count)
            return succeed([StoreUnavailable(OVERLOADED) for _ in range(count)])
        self._pending += count
        self.stats.operations += count
        chunk = _Chunk(count, self._reactor.seconds())
        heads = []
        lastOnKey: dict[int, _Call] = {}
        for index, operation in enumerate(operations):
            call = _Call(chunk, index, operation, self._keyPrefix)
            chunk.calls.append(call)
            previous = lastOnKey.get(call.key)
            lastOnKey[call.key] = call
            if previous is None:
                heads.append(call)
            else:
                previous.follower = call
        chunk.timer = self._reactor.callLater(self._options.timeout, self._expire, chunk)
        for call in heads:
            self._attempt(call, self._current)
        return chunk.deferred

    def _attempt(self, call: _Call, member: int) -> None:
        call.tried += 1
        call.sent = False
        slot = self._slots[member].acquire()
        call.waiting = slot
        slot.addCallbacks(self._send, self._notSent, callbackArgs=(call, member), errbackArgs=(call,))

    def _send(self, _: object, call: _Call, member: int) -> None:
        self._pool.nextCall = call
        try:
            request = self._client.post(
                self._urls[member][call.command], data=call.body, allow_redirects=False, unbuffered=True
            )
        finally:
            self._pool.nextCall = None
        request.addCallback(_readReply)
        call.waiting = request
        request.addBoth(self._answered, call, member)

    def _notSent(self, failure: Failure, call: _Call) -> None:
        """Time ran out while the call waited for a connection slot."""
        failure.trap(CancelledError)
        self._finish(call, StoreUnavailable(TIMED_OUT))

    def _answered(self, result: tuple[int, bytes] | Failure, call: _Call, member: int) -> None:
        self._slots[member].release()
        call.waiting = None
        if isinstance(result, Failure):
            self._failed(result, call, member)
            return
        code, body = result
        if code != 200:
            self._refused(call, member, body)
            return
        try:
            outcome = _outcome(call.command, call.key, json.loads(body))
        except (ValueError, TypeError, AttributeError, IndexError):
            outcome = StoreError(f"etcd sent a reply kvtwist cannot read: {body[:100]!r}")
        self._current = member
        self._nowAvailable()
        self._finish(call, outcome)

    def _failed(self, failure: Failure, call: _Call, member: int) -> None:
        members = len(self._urls)
        if call.chunk.expired:
            if self._current == member:
                # It did not answer in time: the next chunk starts with another member.
                self._current = (member + 1) % members
            self._nowUnavailable(TIMED_OUT)
            unknown = call.sent and call.command != GET
            self._finish(call, StoreUnavailable(OUTCOME_UNKNOWN if unknown else TIMED_OUT))
        elif not call.sent or call.command == GET:
            # Nothing happened (or a read, which may run again): the next member.
            if call.tried < members:
                self._attempt(call, (member + 1) % members)
            elif call.sent:
                self._finish(call, StoreUnavailable(CONNECTION_LOST))
            else:
                reason = _connectReason(failure)
                self._nowUnavailable(reason)
                self._finish(call, StoreUnavailable(reason))
        else:
            # The member went away with a write that may have been applied.
            self._finish(call, StoreUnavailable(OUTCOME_UNKNOWN))

    def _refused(self, call: _Call, member: int, body: bytes) -> None:
        """etcd answered with an error instead of a result."""
        message, code = _errorMessage(body)
        if code not in _UNAVAILABLE_CODES:
            self._finish(call, StoreError(f"etcd refused the request: {message}"))
            return
        members = len(self._urls)
        if call.command == GET and call.tried < members:
            self._attempt(call, (member + 1) % members)
            return
        if self._current == member:
            self._current = (member + 1) % members
        self._nowUnavailable(f"etcd: {message}")
        self._finish(call, StoreUnavailable(f"etcd: {message}"))

    def _expire(self, chunk: _Chunk) -> None:
        """The store's timeout has passed: every operation not yet answered gets its outcome now."""
        chunk.timer = None
        chunk.expired = True
        for call in chunk.calls:
            if call.done:
                continue
            if call.waiting is not None:
                call.waiting.cancel()
                # Cancelling gives the call its outcome; this is only a guard.
                self._finish(call, StoreUnavailable(OUTCOME_UNKNOWN if call.sent and call.command != GET else TIMED_OUT))
            else:
                # Behind another operation on its key, so never sent.
                self._finish(call, StoreUnavailable(TIMED_OUT))

    def _finish(self, call: _Call, outcome: Outcome) -> None:
        if call.done:
            return
        call.done = True
        chunk = call.chunk
        chunk.outcomes[call.index] = outcome
        if isinstance(outcome, StoreError):
            self.stats.failed(outcome.reason if isinstance(outcome, StoreUnavailable) else outcome.kind)
        follower = call.follower
        if follower is not None and not chunk.expired:
            self._attempt(follower, self._current)
        chunk.remaining -= 1
        if chunk.remaining:
            return
        if chunk.timer is not None:
            chunk.timer.cancel()
            chunk.timer = None
        self._pending -= len(chunk.outcomes)
        self.stats.latency.observe(self._reactor.seconds() - chunk.started)
        chunk.deferred.callback(chunk.outcomes)

    def _nowUnavailable(self, reason: str) -> None:
        if self.stats.unavailable is None:
            self._log.warn("kvstore: store {url} unavailable: {reason}", url=self._url, reason=reason)
        self.stats.unavailable = reason

    def _nowAvailable(self) -> None:
        if self.stats.unavailable is not None:
            self.stats.unavailable = None
            self._log.info("kvstore: store {url} available again", url=self._url)


def _hostPort(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")

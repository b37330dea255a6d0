"""
A Twisted client for the kvtwist protocol.

``KVClient`` is a ``Protocol`` whose methods send one request each and
return a ``Deferred`` for its reply. Requests may be issued without waiting
for earlier replies (pipelining): the server answers in order, so each reply
fires the oldest waiting ``Deferred``. Example::

    from twisted.internet.task import react
    from kvtwist.client import connect, hostEndpoint

    async def main(reactor):
        client = await connect(hostEndpoint(reactor, "127.0.0.1", 5000))
        print(await client.put(1, 2))   # True: stored
        print(await client.put(1, 3))   # False: key already exists
        print(await client.get(1))      # 2
        print(await client.delete(1))   # True: deleted
        await client.bye()

    react(main)

``put``, ``get`` and ``delete`` turn replies into Python values and raise
``ServerError`` for an ``Error: ...`` reply; ``request`` sends any line and
returns the raw reply text, for tools that need to see exactly what the
server said.

A server started with ``--password-file`` wants ``auth PASSWORD`` before
anything else: ``connect(endpoint, password=...)`` sends it and fires only
once the server has accepted it, or fails with ``AuthenticationFailed``.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

#: A reply longer than this is not a kvtwist reply; the client gives up
#: instead of buffering without bound.
MAX_REPLY = 65536


class KVClientError(Exception):
    """Base class for the errors a request's ``Deferred`` can fail with."""


class ServerError(KVClientError):
    """The server answered ``Error: ...``; the message is the text after ``Error: ``."""


class UnexpectedReply(KVClientError):
    """The server answered something the protocol does not allow for this request."""


class ConnectionClosing(KVClientError):
    """A request was made after ``bye()`` or after the connection was lost."""


class AuthenticationFailed(KVClientError):
    """The server did not accept ``auth``: a wrong password, or a server with no password set."""


#: What the server answers ``auth`` with when it does not accept it, and
#: what the client says instead (never the password itself).
_AUTH_REFUSALS = {
    "Error: invalid password": "the server refused the password (Error: invalid password)",
    "Error: no password is set on this server": (
        "the server has no password set (Error: no password is set on this server); connect without one"
    ),
}


class KVClient(Protocol):
    """
    One connection to a kvtwist server.

    Every request method returns a ``Deferred`` that fires with the reply to
    that request, in request order; any number may be outstanding at once.
    When the connection is lost, all outstanding ``Deferred`` objects fail
    with the reason.
    """

    #: Set by ``makeConnection``; a stream connection's transport can also abort.
    transport: ITCPTransport | None

    def __init__(self) -> None:
        self._pending: deque[Deferred[str]] = deque()
        self._buffer = b""
        self._closing = False
        self._lost: Failure | None = None
        self._whenClosed: list[Deferred[None]] = []

    # Requests

    def request(self, line: str | bytes) -> Deferred[str]:
        """
        Send one request line (without its line ending) and return its raw reply.

        The reply is the text of the reply line, decoded as UTF-8 (invalid
        bytes shown as backslash escapes) without its LF or CR LF.

        Cancelling the ``Deferred`` (for example through ``addTimeout``)
        stops waiting for this reply without disturbing the connection:
        when the reply comes it is dropped, and later requests still get
        their own replies.
        """
        if isinstance(line, str):
            line = line.encode("utf-8")
        if b"\n" in line:
            raise ValueError("a request is a single line")
        if self._lost is not None or self._closing:
            return fail(ConnectionClosing("the connection is closed or closing"))
        reply: Deferred[str] = Deferred()
        self._pending.append(reply)
        self.connection.write(line + b"\n")
        return reply

    def put(self, key: int, value: int) -> Deferred[bool]:
        """Store ``value`` under ``key`` if absent: True if stored, False if the key already existed."""
        return self.request(b"put %d %d" % (key, value)).addCallback(
            _decode, {"OK": True, "Key already exists": False}
        )

    def get(self, key: int) -> Deferred[int | None]:
        """The value stored under ``key``, or None if there is none."""
        return self.request(b"get %d" % (key,)).addCallback(_decodeValue)

    def delete(self, key: int) -> Deferred[bool]:
        """Remove ``key``: True if it was there, False if it was not."""
        return self.request(b"del %d" % (key,)).addCallback(
            _decode, {"OK": True, "Key not found": False}
        )

    def auth(self, password: str | bytes) -> Deferred[None]:
        """
        Send ``auth PASSWORD``; fires with None once the server answers ``OK``.

        Fails with ``AuthenticationFailed`` if the server refuses it (a wrong
        password, or no password set on the server), and raises
        ``ValueError`` at once for a password the protocol cannot carry: it
        is one token, without spaces, tabs, line endings or NULs.
        """
        line = _authRequest(password)

        def accepted(reply: str) -> None:
            if reply in _AUTH_REFUSALS:
                raise AuthenticationFailed(_AUTH_REFUSALS[reply])
            if reply != "OK":
                raise _unexpected(reply)

        return self.request(line).addCallback(accepted)

    def bye(self) -> Deferred[None]:
        """
        Say goodbye and close; fires once the connection is closed.

        Fails with ``UnexpectedReply`` if the server does not answer
        ``Goodbye``. The client closes its side itself after the reply, so a
        server that forgets to close cannot keep this waiting.
        """
        goodbye = self.request(b"Bye")
        self._closing = True

        def closed(reply: str) -> Deferred[None]:
            if reply != "Goodbye":
                raise UnexpectedReply(f"expected 'Goodbye', got {reply!r}")
            done = self.whenClosed()
            self.connection.loseConnection()
            return done

        return goodbye.addCallback(closed)

    def whenClosed(self) -> Deferred[None]:
        """A ``Deferred`` that fires with None when the connection is gone."""
        if self._lost is not None:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._whenClosed.append(closed)
        return closed

    @property
    def outstanding(self) -> int:
        """How many requests are still waiting for their reply."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        """Whether the connection is gone."""
        return self._lost is not None

    @property
    def connection(self) -> ITCPTransport:
        """The transport of a connected client."""
        assert self.transport is not None, "not connected"
        return self.transport

    # Protocol

    def dataReceived(self, data: bytes) -> None:
        if b"\n" not in data:
            self._buffer += data
            if len(self._buffer) > MAX_REPLY:
                self._protocolError(UnexpectedReply(f"reply line longer than {MAX_REPLY} bytes"))
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if not self._pending:
                self._protocolError(UnexpectedReply(f"reply without a request: {line!r}"))
                return
            if line.endswith(b"\r"):
                line = line[:-1]
            waiting = self._pending.popleft()
            # A cancelled request (see ``request``) has already fired; its
            # reply still arrives in its turn and is dropped here.
            if not waiting.called:
                waiting.callback(line.decode("utf-8", "backslashreplace"))
            if self._lost is not None:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        pending, self._pending = self._pending, deque()
        for waiting in pending:
            if not waiting.called:
                waiting.errback(reason)
        closed, self._whenClosed = self._whenClosed, []
        for done in closed:
            done.callback(None)

    def _protocolError(self, error: KVClientError) -> None:
        # The reply stream can no longer be matched to requests: fail the
        # oldest request with the reason and drop the connection, which
        # fails the rest.
        while self._pending:
            waiting = self._pending.popleft()
            if not waiting.called:
                waiting.errback(error)
                break
        self.connection.abortConnection()


def _decode(reply: str, meanings: dict[str, bool]) -> bool:
    try:
        return meanings[reply]
    except KeyError:
        raise _unexpected(reply) from None


def valueOf(reply: str) -> int | None:
    """The integer a get reply carries, or None if ``reply`` is not a plain decimal integer."""
    digits = reply[1:] if reply.startswith("-") else reply
    if digits.isascii() and digits.isdigit():
        return int(reply)
    return None


def _decodeValue(reply: str) -> int | None:
    if reply == "Key not found":
        return None
    value = valueOf(reply)
    if value is None:
        raise _unexpected(reply)
    return value


def _unexpected(reply: str) -> KVClientError:
    if reply.startswith("Error: "):
        return ServerError(reply[len("Error: ") :])
    return UnexpectedReply(reply)


def _authRequest(password: str | bytes) -> bytes:
    """The ``auth`` request line for ``password``; ValueError if it is not one token."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not password or password.split() != [password] or b"\0" in password:
        raise ValueError("a password is one word: no spaces, tabs, line endings or NULs")
    return b"auth " + password


def hostEndpoint(reactor: IReactorCore, host: str, port: int, timeout: float = 10.0) -> IStreamClientEndpoint:
    """
    A client endpoint for ``host`` (a name, an IPv4 or an IPv6 address) and ``port``.

    ``HostnameEndpoint`` resolves the name and tries every address it gets,
    so ``localhost`` works whether the server listens on IPv4 or IPv6.
    """
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def connect(endpoint: IStreamClientEndpoint, password: str | bytes | None = None) -> Deferred[KVClient]:
    """
    Connect a new ``KVClient`` through ``endpoint``; fires once connected.

    With ``password``, the client authenticates first (``auth``), and the
    ``Deferred`` fires only once the server has accepted the password. If
    it does not, the connection is closed and the ``Deferred`` fails with
    ``AuthenticationFailed``, whose message says why without the password.
    """
    if password is None:
        return connectProtocol(endpoint, KVClient())
    # A password the protocol cannot carry is refused before connecting.
    _authRequest(password)
    connecting = connectProtocol(endpoint, KVClient())

    def authenticate(client: KVClient) -> Deferred[KVClient]:
        def refused(failure: Failure) -> Failure:
            # A client that is not let in is of no use to the caller.
            if not client.closed:
                client.connection.loseConnection()
            return failure

        return client.auth(password).addCallbacks(lambda _: client, refused)

    return connecting.addCallback(authenticate)


__all__ = [
    "KVClient",
    "KVClientError",
    "ServerError",
    "UnexpectedReply",
    "ConnectionClosing",
    "AuthenticationFailed",
    "connect",
    "hostEndpoint",
    "MAX_REPLY",
    "valueOf",
]

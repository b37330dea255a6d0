"""The client library: through StringTransport, then against a real kvstore server."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from kvtwist.client import (
    MAX_REPLY,
    AuthenticationFailed,
    ConnectionClosing,
    KVClient,
    ServerError,
    UnexpectedReply,
    connect,
    hostEndpoint,
)


def connected() -> tuple[KVClient, StringTransport]:
    client = KVClient()
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


def result(deferred: Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (raising its failure)."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


# (call, request line it must send, reply line, Python result)
EXCHANGES = [
    (lambda c: c.put(1, 2), b"put 1 2\n", b"OK\n", True),
    (lambda c: c.put(1, 3), b"put 1 3\n", b"Key already exists\n", False),
    (lambda c: c.get(1), b"get 1\n", b"2\n", 2),
    (lambda c: c.get(-9223372036854775808), b"get -9223372036854775808\n", b"-7\n", -7),
    (lambda c: c.get(5), b"get 5\n", b"Key not found\n", None),
    (lambda c: c.delete(1), b"del 1\n", b"OK\n", True),
    (lambda c: c.delete(5), b"del 5\n", b"Key not found\n", False),
    (lambda c: c.request("anything at all"), b"anything at all\n", b"whatever\n", "whatever"),
]


@pytest.mark.parametrize("call, sent, reply, expected", EXCHANGES)
def test_requestAndReply(call: Any, sent: bytes, reply: bytes, expected: Any) -> None:
    client, transport = connected()
    deferred = call(client)
    assert transport.value() == sent
    assert not deferred.called
    client.dataReceived(reply)
    assert result(deferred) == expected


@pytest.mark.parametrize("call, sent, reply, expected", EXCHANGES)
def test_crlfRepliesAreAccepted(call: Any, sent: bytes, reply: bytes, expected: Any) -> None:
    client, _ = connected()
    deferred = call(client)
    client.dataReceived(reply[:-1] + b"\r\n")
    assert result(deferred) == expected


def test_pipelinedRepliesFireInRequestOrder() -> None:
    """Many requests before any reply; the replies, however split, go to their own requests."""
    client, transport = connected()
    deferreds = [call(client) for call, _, _, _ in EXCHANGES]
    assert transport.value() == b"".join(sent for _, sent, _, _ in EXCHANGES)
    assert client.outstanding == len(EXCHANGES)
    replies = b"".join(reply for _, _, reply, _ in EXCHANGES)
    for split in range(len(replies) + 1):
        client, _ = connected()
        deferreds = [call(client) for call, _, _, _ in EXCHANGES]
        client.dataReceived(replies[:split])
        client.dataReceived(replies[split:])
        assert [result(d) for d in deferreds] == [expected for _, _, _, expected in EXCHANGES]


def test_byteByByte() -> None:
    client, _ = connected()
    deferreds = [client.get(1), client.get(2)]
    for byte in b"10\n-20\n":
        client.dataReceived(bytes([byte]))
    assert [result(d) for d in deferreds] == [10, -20]


@pytest.mark.parametrize("call", [lambda c: c.put(1, 2), lambda c: c.get(1), lambda c: c.delete(1)])
def test_errorReplyRaisesServerError(call: Any) -> None:
    client, _ = connected()
    deferred = call(client)
    client.dataReceived(b"Error: key must be a signed 64-bit decimal integer\n")
    with pytest.raises(ServerError, match="^key must be a signed 64-bit decimal integer$"):
        result(deferred)


@pytest.mark.parametrize(
    "call, reply",
    [
        (lambda c: c.put(1, 2), b"Key not found\n"),
        (lambda c: c.get(1), b"OK\n"),
        (lambda c: c.get(1), b"1e3\n"),
        (lambda c: c.get(1), b"\xd9\xa1\n"),
        (lambda c: c.delete(1), b"Key already exists\n"),
    ],
)
def test_replyThatDoesNotFitRaisesUnexpectedReply(call: Any, reply: bytes) -> None:
    client, _ = connected()
    deferred = call(client)
    client.dataReceived(reply)
    with pytest.raises(UnexpectedReply):
        result(deferred)


def test_connectionStaysUsableAfterAnErrorReply() -> None:
    client, _ = connected()
    bad, good = client.get(1), client.get(2)
    client.dataReceived(b"Error: nope\n3\n")
    with pytest.raises(ServerError):
        result(bad)
    assert result(good) == 3


def test_byeWaitsForGoodbyeAndCloses() -> None:
    client, transport = connected()
    outcome: list[object] = []
    client.bye().addBoth(outcome.append)
    assert transport.value() == b"Bye\n"
    client.dataReceived(b"Goodbye\n")
    assert transport.disconnecting
    assert outcome == []
    client.connectionLost(Failure(ConnectionLost()))
    assert outcome == [None]


def test_byeWithoutGoodbyeFails() -> None:
    client, _ = connected()
    done = client.bye()
    client.dataReceived(b"OK\n")
    with pytest.raises(UnexpectedReply):
        result(done)


def test_noRequestsAfterBye() -> None:
    client, transport = connected()
    client.bye()
    with pytest.raises(ConnectionClosing):
        result(client.get(1))
    assert transport.value() == b"Bye\n"


def test_connectionLossFailsEveryOutstandingRequest() -> None:
    client, _ = connected()
    pending = [client.get(1), client.put(1, 2)]
    client.connectionLost(Failure(ConnectionLost()))
    for deferred in pending:
        with pytest.raises(ConnectionLost):
            result(deferred)
    with pytest.raises(ConnectionClosing):
        result(client.get(1))
    assert result(client.whenClosed()) is None


def test_cancelledRequestKeepsTheConnectionInStep() -> None:
    """Giving up on one reply (a timeout) must not shift the replies of later requests."""
    client, transport = connected()
    slow, later = client.get(1), client.get(2)
    slow.cancel()
    slow.addErrback(lambda failure: None)
    client.dataReceived(b"1\n2\n")
    assert result(later) == 2
    assert not transport.disconnecting


def test_replyWithoutRequestDropsTheConnection() -> None:
    client, transport = connected()
    client.dataReceived(b"OK\n")
    assert transport.disconnected or transport.disconnecting


def test_endlessReplyLineDropsTheConnection() -> None:
    client, transport = connected()
    deferred = client.get(1)
    client.dataReceived(b"1" * (MAX_REPLY + 1))
    with pytest.raises(UnexpectedReply):
        result(deferred)


def test_requestsAreSingleLines() -> None:
    client, _ = connected()
    with pytest.raises(ValueError):
        client.request(b"get 1\nget 2")


class StringEndpoint:
    """A client endpoint whose connections are StringTransports, connected at once."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.clients: list[KVClient] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.transports.append(transport)
        self.clients.append(protocol)
        protocol.makeConnection(transport)
        return succeed(protocol)


def connectingWithPassword(password: Any) -> tuple[Deferred[KVClient], KVClient, StringTransport]:
    endpoint = StringEndpoint()
    deferred = connect(endpoint, password=password)  # type: ignore[arg-type]
    [client], [transport] = endpoint.clients, endpoint.transports
    return deferred, client, transport


def fired(deferred: Deferred[Any]) -> bool:
    outcome: list[object] = []
    deferred.addBoth(lambda value: outcome.append(value) or value)
    return bool(outcome)


@pytest.mark.parametrize(
    "password, sent",
    [
        ("s3cret", b"auth s3cret\n"),
        (b"\xc3\xa9t\xc3\xa9", b"auth \xc3\xa9t\xc3\xa9\n"),
        ("été", "auth été\n".encode()),
    ],
)
def test_connectWithPasswordAuthenticatesBeforeFiring(password: Any, sent: bytes) -> None:
    deferred, client, transport = connectingWithPassword(password)
    assert transport.value() == sent
    assert not fired(deferred), "a client is handed out only once it is let in"
    client.dataReceived(b"OK\n")
    assert result(deferred) is client and not transport.disconnecting
    client.get(1)
    assert transport.value() == sent + b"get 1\n"


@pytest.mark.parametrize(
    "reply, says",
    [
        (b"Error: invalid password\n", "the server refused the password (Error: invalid password)"),
        (b"Error: no password is set on this server\n", "the server has no password set"),
    ],
)
def test_connectFailsClearlyWhenThePasswordIsNotAccepted(reply: bytes, says: str) -> None:
    deferred, client, transport = connectingWithPassword("s3cret")
    client.dataReceived(reply)
    with pytest.raises(AuthenticationFailed) as raised:
        result(deferred)
    assert str(raised.value).startswith(says)
    assert "s3cret" not in str(raised.value)
    assert transport.disconnecting, "a client that is not let in is closed"


def test_connectFailsWhenTheConnectionEndsBeforeTheReply() -> None:
    deferred, client, _ = connectingWithPassword("s3cret")
    client.connectionLost(Failure(ConnectionLost()))
    with pytest.raises(ConnectionLost):
        result(deferred)


def test_anOddReplyToAuthIsAnError() -> None:
    deferred, client, transport = connectingWithPassword("s3cret")
    client.dataReceived(b"Error: authentication required\n")
    with pytest.raises(ServerError, match="^authentication required$"):
        result(deferred)
    assert transport.disconnecting


@pytest.mark.parametrize("password", ["", "two words", "tab\there", "line\nend", "nul\0", b"cr\r"])
def test_aPasswordTheProtocolCannotCarryIsRefusedBeforeConnecting(password: Any) -> None:
    endpoint = StringEndpoint()
    with pytest.raises(ValueError, match="one word"):
        connect(endpoint, password=password)  # type: ignore[arg-type]
    assert endpoint.transports == []


def test_connectWithoutPasswordSendsNothing() -> None:
    endpoint = StringEndpoint()
    client = result(connect(endpoint))  # type: ignore[arg-type]
    assert isinstance(client, KVClient)
    assert endpoint.transports[0].value() == b""


class RealServerTests(TestCase):
    """The library against a real ``twistd kvstore`` on the running reactor."""

    def setUp(self) -> None:
        from serverproc import start_server

        self.server = start_server()
        self.addCleanup(self.server.stop)

    async def test_sampleSessionThroughTheLibrary(self) -> None:
        from twisted.internet import reactor

        client = await connect(hostEndpoint(reactor, self.server.host, self.server.port))
        self.assertTrue(await client.put(1, 2))
        self.assertFalse(await client.put(1, 3))
        self.assertTrue(await client.put(2, 3))
        self.assertEqual(await client.get(1), 2)
        self.assertTrue(await client.delete(1))
        self.assertIsNone(await client.get(1))
        self.assertFalse(await client.delete(5))
        await client.bye()

    async def test_pipelinedThousands(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import gatherResults

        client = await connect(hostEndpoint(reactor, self.server.host, self.server.port))
        keys = range(3000)
        puts = await gatherResults([client.put(key, -key) for key in keys])
        values = await gatherResults([client.get(key) for key in reversed(keys)])
        self.assertEqual(puts, [True] * len(keys))
        self.assertEqual(values, [-key for key in reversed(keys)])
        await client.bye()


class PasswordServerTests(TestCase):
    """``connect(..., password=...)`` against real servers with and without ``--password-file``."""

    def setUp(self) -> None:
        from serverproc import start_server

        directory = Path(tempfile.mkdtemp(prefix="kvtwist-client-"))
        self.addCleanup(shutil.rmtree, directory, True)
        passwordFile = directory / "password"
        passwordFile.write_text("s3cret\n")
        self.locked = start_server("--password-file", str(passwordFile))
        self.addCleanup(self.locked.stop)
        self.open = start_server()
        self.addCleanup(self.open.stop)

    def endpoint(self, server: Any) -> Any:
        from twisted.internet import reactor

        return hostEndpoint(reactor, server.host, server.port)

    async def test_theRightPasswordLetsTheClientIn(self) -> None:
        client = await connect(self.endpoint(self.locked), password="s3cret")
        self.assertTrue(await client.put(1, 2))
        self.assertEqual(await client.get(1), 2)
        await client.bye()

    async def test_withoutThePasswordEveryRequestIsRefused(self) -> None:
        client = await connect(self.endpoint(self.locked))
        with self.assertRaisesRegex(ServerError, "^authentication required$"):
            await client.get(1)
        await client.bye()

    async def test_aWrongPasswordFailsTheConnect(self) -> None:
        with self.assertRaisesRegex(AuthenticationFailed, "refused the password"):
            await connect(self.endpoint(self.locked), password="guess")

    async def test_aPasswordForAServerWithoutOneFailsTheConnect(self) -> None:
        with self.assertRaisesRegex(AuthenticationFailed, "has no password set"):
            await connect(self.endpoint(self.open), password="s3cret")

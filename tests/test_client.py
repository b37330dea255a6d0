"""The client library: through StringTransport, then against a real kvstore server."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from kvtwist.client import (
    MAX_REPLY,
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

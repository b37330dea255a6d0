"""The wire protocol through StringTransport: every rule of docs/protocol.md."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist import compiled
from kvtwist.server.factory import KVFactory
from kvtwist.server.protocol import TIME_EVERY, KVProtocol, parseInt64
from kvtwist.storage.interface import Batch, IReplyTarget
from kvtwist.storage.memory import MemoryStore

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Every test here runs on both in-memory stores: the pure-Python reference,
# and the compiled one whose runChunk takes the common requests at C level
# (kvtwist.compiled; skipped where the extension is not built).
STORES = {"pure": MemoryStore, "compiled": compiled.CompiledStore}
_storeKind = ["pure"]


@pytest.fixture(autouse=True, params=list(STORES))
def storeKind(request: pytest.FixtureRequest) -> Iterator[str]:
    if STORES[request.param] is None:
        pytest.skip(f"no compiled path: {compiled.unavailable}")
    _storeKind[0] = request.param
    yield request.param
    _storeKind[0] = "pure"


def newStore() -> Any:
    """A store of the kind the running test is parametrized with."""
    return STORES[_storeKind[0]]()  # type: ignore[misc]


class CountingTransport(StringTransport):
    """Counts writes, to check that one received chunk gives one batch of replies."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def connect(factory: KVFactory | None = None) -> tuple[KVProtocol, CountingTransport]:
    factory = factory or KVFactory(newStore(), reactor=Clock())
    proto = factory.buildProtocol(None)
    transport = CountingTransport()
    proto.makeConnection(transport)
    return proto, transport


def run(requests: bytes, factory: KVFactory | None = None) -> bytes:
    proto, transport = connect(factory)
    proto.dataReceived(requests)
    return transport.value()


# (requests, expected replies): the assignment's sample session first.
CONVERSATIONS = [
    (b"put 1 2\nput 1 3\nput 2 3\nget 1\ndel 1\nget 1\ndel 5\n",
     b"OK\nKey already exists\nOK\n2\nOK\nKey not found\nKey not found\n"),
    (b"get 1\n", b"Key not found\n"),
    (b"put 1 2\nget 1\nput 1 9\nget 1\n", b"OK\n2\nKey already exists\n2\n"),
    (b"put 1 2\ndel 1\nput 1 3\nget 1\n", b"OK\nOK\nOK\n3\n"),
    # Case-insensitive verbs, runs of spaces and tabs.
    (b"PUT 1 2\nGeT 1\nDEL 1\n", b"OK\n2\nOK\n"),
    (b"  put \t 4\t\t5   \nget\t4\n", b"OK\n5\n"),
    # CRLF, NUL as a terminator, blank requests get no reply.
    (b"put 1 2\r\nget 1\r\n", b"OK\n2\n"),
    (b"put 1 2\0get 1\0", b"OK\n2\n"),
    (b"get 1\0\n", b"Key not found\n"),
    (b"\n\n  \n\t\r\nget 1\n", b"Key not found\n"),
    # Integers compare by value; replies use the canonical form.
    (b"put 007 1\nget 7\nget +7\nget 0000000000000000000000000000007\n", b"OK\n1\n1\n1\n"),
    (b"put -0 +12\nget 0\nget 00\n", b"OK\n12\n12\n"),
    (b"put 1 -0005\nget 1\n", b"OK\n-5\n"),
    (b"put -9223372036854775808 9223372036854775807\nget -9223372036854775808\n",
     b"OK\n9223372036854775807\n"),
    # Bye ends the conversation; what follows it is not executed.
    (b"put 1 2\nBye\nput 3 4\n", b"OK\nGoodbye\n"),
    (b"bye\n", b"Goodbye\n"),
    (b"BYE\r\n", b"Goodbye\n"),
]


@pytest.mark.parametrize("requests, replies", CONVERSATIONS)
def test_conversation(requests: bytes, replies: bytes) -> None:
    assert run(requests) == replies


# Each kind of bad input, with the store state that must survive it.
BAD_REQUESTS = [
    b"foo 1 2", b"putt 1 2", b"get", b"get 1 2", b"put 1", b"put 1 2 3", b"del", b"del 1 2",
    b"Bye now", b"put 1_000 1", b"put 1e3 1", b"put 0x10 1", b"put 1 0x10", b"put 1.0 1",
    b"put 9223372036854775808 1", b"put 1 -9223372036854775809", b"put 1 99999999999999999999",
    b"put \xd9\xa1 1", b"put \xef\xbc\x91 1", b"put - 1", b"put + 1", b"put +-1 1", b"put --1 1",
    b"put 1 2\x0b3", b"put 1 2\r3", b"get 1\x0c", b"get \x1b[31m", b"\x1b[2J", b"\xff\xfe",
]


@pytest.mark.parametrize("request_", BAD_REQUESTS)
def test_bad_input(request_: bytes) -> None:
    factory = KVFactory(newStore(), reactor=Clock())
    factory.store.put(1, 5, Batch())
    proto, transport = connect(factory)
    proto.dataReceived(request_ + b"\nget 1\n")
    error, after = transport.value().split(b"\n")[:2]
    assert error.startswith(b"Error: ")
    # Never echo the client's bytes: only printable ASCII we wrote ourselves.
    assert re.fullmatch(rb"[ -~]+", error)
    for token in request_.split():
        if len(token) > 3:
            assert token not in error
    assert after == b"5"
    assert dict(factory.store.items()) == {1: 5}
    assert not transport.disconnecting


@pytest.mark.parametrize("line", [b"get 1\x0b", b"get 1\x0c", b"get\x0b1", b"get\x0c1"])
def test_vertical_tab_and_form_feed_are_not_separators(line: bytes) -> None:
    # bytes.split() would take them for spaces and answer "5".
    factory = KVFactory(newStore(), reactor=Clock())
    factory.store.put(1, 5, Batch())
    proto, transport = connect(factory)
    proto.dataReceived(line + b"\n")
    assert transport.value().startswith(b"Error: ")


def test_error_texts_name_the_problem() -> None:
    replies = run(b"foo\nput 1\nput x 1\nput 1 x\n").decode().splitlines()
    assert "unknown command" in replies[0]
    assert "wrong number of arguments" in replies[1] and "put KEY VALUE" in replies[1]
    assert "key" in replies[2]
    assert "value" in replies[3]


def test_bye_closes_connection() -> None:
    proto, transport = connect()
    proto.dataReceived(b"Bye\nput 1 2\n")
    assert transport.disconnecting
    assert proto.factory.store.get(1, Batch()) is None
    proto.dataReceived(b"put 3 4\n")
    assert transport.value() == b"Goodbye\n"
    assert proto.factory.store.get(3, Batch()) is None


@pytest.mark.parametrize("limit", [10, 4096])
def test_request_at_the_limit_is_served(limit: int) -> None:
    factory = KVFactory(newStore(), maxRequest=limit, reactor=Clock())
    request = b"get " + b"0" * (limit - 5) + b"1"
    assert len(request) == limit
    assert run(request + b"\r\n", factory) == b"Key not found\n"


@pytest.mark.parametrize("limit", [10, 4096])
def test_request_over_the_limit_closes(limit: int) -> None:
    factory = KVFactory(newStore(), maxRequest=limit, reactor=Clock())
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 2\nget " + b"0" * (limit - 3) + b"1\nput 3 4\n")
    assert transport.value() == b"OK\nError: request too long\n"
    assert transport.disconnecting
    assert factory.store.get(3, Batch()) is None


def test_unfinished_request_over_the_limit_closes_at_once() -> None:
    factory = KVFactory(newStore(), maxRequest=100, reactor=Clock())
    proto, transport = connect(factory)
    proto.dataReceived(b"get 1\n" + b"9" * 60)
    assert transport.value() == b"Key not found\n"
    proto.dataReceived(b"9" * 60)
    assert transport.value() == b"Key not found\nError: request too long\n"
    assert transport.disconnecting


def test_long_request_does_not_disturb_other_clients() -> None:
    factory = KVFactory(newStore(), maxRequest=64, reactor=Clock())
    noisy, noisyTransport = connect(factory)
    quiet, quietTransport = connect(factory)
    quiet.dataReceived(b"put 1 2\n")
    noisy.dataReceived(b"x" * 1000)
    quiet.dataReceived(b"get 1\n")
    assert noisyTransport.disconnecting
    assert not quietTransport.disconnecting
    assert quietTransport.value() == b"OK\n2\n"


SCRIPT = b"put 1 2\r\nget 1\nPUT 007 -3\0get 7\n\nfoo\nput x 1\ndel 1\nget 1\nBye\nget 7\n"
SCRIPT_REPLIES = (
    b"OK\n2\nOK\n-3\nError: unknown command (expected put, get, del or Bye)\n"
    b"Error: key must be a signed 64-bit decimal integer\nOK\nKey not found\nGoodbye\n"
)


@pytest.mark.parametrize("cut", range(len(SCRIPT) + 1))
def test_input_split_at_every_byte(cut: int) -> None:
    proto, transport = connect()
    proto.dataReceived(SCRIPT[:cut])
    proto.dataReceived(SCRIPT[cut:])
    assert transport.value() == SCRIPT_REPLIES


def test_input_one_byte_at_a_time() -> None:
    proto, transport = connect()
    for i in range(len(SCRIPT)):
        proto.dataReceived(SCRIPT[i : i + 1])
    assert transport.value() == SCRIPT_REPLIES


def test_pipelined_requests_answered_in_order_in_one_write() -> None:
    n = 20000
    requests = b"".join(b"put %d %d\n" % (k, k * 3) for k in range(n))
    requests += b"".join(b"get %d\n" % k for k in range(n))
    proto, transport = connect()
    proto.dataReceived(requests)
    replies = transport.value().split(b"\n")[:-1]
    assert replies[:n] == [b"OK"] * n
    assert replies[n:] == [str(k * 3).encode() for k in range(n)]
    assert transport.writes == 1


def test_half_close_still_gets_replies() -> None:
    proto, transport = connect()
    proto.dataReceived(b"put 1 2\nget 1")
    assert transport.value() == b"OK\n"
    proto.readConnectionLost()
    assert transport.value() == b"OK\n2\n"
    assert transport.disconnecting


def test_half_close_with_nothing_pending_closes() -> None:
    proto, transport = connect()
    proto.readConnectionLost()
    assert transport.value() == b""
    assert transport.disconnecting


def test_idle_timeout() -> None:
    clock = Clock()
    factory = KVFactory(newStore(), idleTimeout=5, reactor=clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(4)
    proto.dataReceived(b"get 1\n")
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    assert transport.value() == b"Key not found\nError: idle timeout\n"


def test_after_auth_requests_restart_the_idle_timer_and_are_timed() -> None:
    # A connection takes the fast path only once unlocked; with an idle
    # timeout and --metrics, each chunk must still restart the timer and
    # have its latency sampled.
    clock = Clock()
    factory = KVFactory(newStore(), idleTimeout=5, password=b"secret", reactor=clock, timing=True)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"auth secret\n")
    proto.dataReceived(b"put 1 2\n")
    for _ in range(2):
        sampled = factory.stats.latency.count
        for _ in range(TIME_EVERY):
            clock.advance(4)
            proto.dataReceived(b"get 1\n")
        # Whichever path runs them (the compiled runner counts its own
        # chunks), any TIME_EVERY chunks in a row hold one that is timed.
        assert factory.stats.latency.count == sampled + 1
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    assert transport.value() == b"OK\nOK\n" + b"2\n" * 2 * TIME_EVERY + b"Error: idle timeout\n"


def test_no_idle_timeout_by_default() -> None:
    clock = Clock()
    proto = KVFactory(newStore(), reactor=clock).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    clock.advance(10**6)
    assert not transport.disconnecting
    assert not clock.getDelayedCalls()


def test_too_many_connections() -> None:
    factory = KVFactory(newStore(), maxConnections=2, reactor=Clock())
    first, _ = connect(factory)
    connect(factory)
    refused = factory.buildProtocol(None)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.value() == b"Error: too many connections\n"
    assert transport.disconnecting
    # A slot frees up when a client leaves.
    first.connectionLost()
    again, againTransport = connect(factory)
    again.dataReceived(b"get 1\n")
    assert againTransport.value() == b"Key not found\n"


def test_stops_reading_while_client_does_not_read_replies() -> None:
    proto, transport = connect()
    assert transport.producer is proto
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"


class HeldStore(MemoryStore):
    """Holds every batch of replies back until released, as a durable store does until fsync."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[IReplyTarget, Batch]] = []

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        self.held.append((target, batch))

    def release(self) -> None:
        held, self.held = self.held, []
        for target, batch in held:
            target.sendReplies(batch)


def test_replies_and_close_wait_for_the_store() -> None:
    store = HeldStore()
    proto, transport = connect(KVFactory(store, reactor=Clock()))
    proto.dataReceived(b"put 1 2\n")
    proto.dataReceived(b"get 1\nBye\n")
    assert transport.value() == b""
    assert not transport.disconnecting
    store.release()
    assert transport.value() == b"OK\n2\nGoodbye\n"
    assert transport.disconnecting


# Property-based checks of the parser.

@given(st.integers(INT64_MIN, INT64_MAX), st.integers(0, 30), st.sampled_from(["", "+"]))
def test_parse_accepts_every_int64_spelling(value: int, zeros: int, plus: str) -> None:
    sign = "-" if value < 0 else plus
    text = f"{sign}{'0' * zeros}{abs(value)}".encode()
    assert parseInt64(text) == value


@given(st.binary(max_size=25))
def test_parse_accepts_only_ascii_decimal_in_range(token: bytes) -> None:
    result = parseInt64(token)
    if re.fullmatch(rb"[+-]?[0-9]+", token) and INT64_MIN <= int(token) <= INT64_MAX:
        assert result == int(token)
    else:
        assert result is None


@given(st.integers(2**63, 2**80) | st.integers(-(2**80), -(2**63) - 1))
def test_parse_rejects_out_of_range(value: int) -> None:
    assert parseInt64(str(value).encode()) is None


requests = st.lists(
    st.tuples(
        st.sampled_from([b"put", b"PUT", b"get", b"del", b"frob"]),
        st.lists(st.integers(-3, 3).map(lambda i: b"%d" % i), max_size=3),
        st.sampled_from([b"\n", b"\r\n", b"\0"]),
    ),
    max_size=40,
).map(lambda rs: b"".join(verb + b" " + b" ".join(args) + end for verb, args, end in rs))


@given(requests, st.lists(st.integers(0, 400), max_size=8))
def test_any_split_gives_the_same_replies(script: bytes, cuts: list[int]) -> None:
    whole = run(script)
    proto, transport = connect()
    start = 0
    for cut in sorted(c for c in cuts if c <= len(script)) + [len(script)]:
        proto.dataReceived(script[start:cut])
        start = cut
    assert transport.value() == whole
    # Every request that is not blank gets exactly one reply line.
    assert whole.count(b"\n") == len([r for r in re.split(rb"\r?\n|\0", script) if r.strip()])


# A chunk that is one plain request: _runPlainLine, the pure path's shortcut.

PLAIN = [b"get 5\n", b"put 5 6\n", b"del 5\n", b"put 007 1\n", b"get 99999999999999999999\n", b"put 5 0\n"]
NOT_PLAIN = [
    b"get 5\r\n", b"GET 5\n", b"get  5\n", b" get 5\n", b"get 5 \n", b"get\t5\n", b"get -5\n", b"put 5 +6\n",
    b"get 5", b"get 5\nget 6\n", b"get 5\0\n", b"get 5\0get 6\n", b"put 5\n", b"get 5 6\n", b"bye\n", b"\n",
    b"get 5\x0b\n", b"auth x\n", b"get \n",
]


@pytest.mark.parametrize("chunk", PLAIN)
def test_a_plain_request_takes_the_shortcut_and_is_answered_as_usual(chunk: bytes) -> None:
    factory, reference = KVFactory(newStore(), reactor=Clock()), KVFactory(newStore(), reactor=Clock())
    factory.store.put(5, 1, Batch())
    reference.store.put(5, 1, Batch())
    proto, transport = connect(factory)
    assert proto._runPlainLine(chunk)
    # The same request after a blank line, which the shortcut never takes.
    assert transport.value() == run(b"\n" + chunk, reference)
    assert transport.value().count(b"\n") == 1
    assert factory.stats.requestCounts() == reference.stats.requestCounts() and sum(factory.stats.requestCounts()) == 1
    assert dict(factory.store.items()) == dict(reference.store.items())
    assert factory.stats.receivedBytes() == len(chunk)


@pytest.mark.parametrize("chunk", NOT_PLAIN)
def test_any_other_chunk_is_left_to_the_ordinary_path(chunk: bytes) -> None:
    factory = KVFactory(newStore(), reactor=Clock())
    factory.store.put(5, 1, Batch())
    proto, transport = connect(factory)
    assert not proto._runPlainLine(chunk)
    assert transport.value() == b"" and dict(factory.store.items()) == {5: 1}
    assert not any(factory.stats.requestCounts()) and factory.stats.receivedBytes() == 0


def test_a_plain_request_over_the_limit_is_left_to_the_ordinary_path() -> None:
    proto, transport = connect(KVFactory(newStore(), maxRequest=4, reactor=Clock()))
    assert not proto._runPlainLine(b"get 5\n")
    proto.dataReceived(b"get 5\n")
    assert transport.value() == b"Error: request too long\n"


plainish = st.lists(
    st.sampled_from([b"put", b"get", b"del", b"GET", b"bye", b"1", b"07", b"-3", b"+4", b"99999999999999999999", b""])
    | st.sampled_from([b"\r", b"\t", b"\0", b"\x0b", b"5\r", b"\n"]),
    max_size=4,
).map(b" ".join)


@given(plainish, st.integers(1, 40))
def test_a_line_gets_the_same_reply_and_counts_whichever_path_takes_it(line: bytes, limit: int) -> None:
    def serve(chunk: bytes) -> tuple[bytes, list[int], dict[int, int]]:
        factory = KVFactory(newStore(), maxRequest=limit, reactor=Clock())
        factory.store.put(7, 1, Batch())
        proto, transport = connect(factory)
        proto.dataReceived(chunk)
        return transport.value(), factory.stats.requestCounts(), dict(factory.store.items())

    # After a blank line, the chunk is never a plain request on its own.
    assert serve(line + b"\n") == serve(b"\n" + line + b"\n")


# Connections that always end (a Clock drives every timer).

def clocked(**options) -> tuple[KVProtocol, StringTransport, Clock]:
    clock = Clock()
    proto = KVFactory(newStore(), reactor=clock, **options).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_an_unfinished_request_has_the_request_timeout_from_its_first_byte() -> None:
    proto, transport, clock = clocked(requestTimeout=30)
    proto.dataReceived(b"get 1\nput 1")
    for _ in range(29):
        clock.advance(1)
        proto.dataReceived(b" ")  # a byte a second keeps nothing alive
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value() == b"Key not found\nError: request timeout\n"
    assert transport.disconnecting


def test_a_finished_request_stops_the_request_clock() -> None:
    proto, transport, clock = clocked(requestTimeout=30)
    proto.dataReceived(b"put 1")
    clock.advance(20)
    proto.dataReceived(b" 2\nget")
    clock.advance(20)
    assert not transport.disconnecting, "the second request began 20 s ago"
    proto.dataReceived(b" 1\n")
    clock.advance(100)
    assert not transport.disconnecting, "nothing is unfinished"
    assert transport.value() == b"OK\n2\n"
    assert not clock.getDelayedCalls()


def test_blank_lines_do_not_keep_a_connection_from_idling_out() -> None:
    proto, transport, clock = clocked(idleTimeout=5)
    for _ in range(6):
        clock.advance(1)
        proto.dataReceived(b"\n")
    assert transport.value() == b"Error: idle timeout\n"


def test_a_tls_handshake_has_the_time_of_a_request() -> None:
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    clock = Clock()
    factory = KVFactory(newStore(), reactor=clock, requestTimeout=10)
    silent, finished = factory.buildProtocol(None), factory.buildProtocol(None)
    silentTransport, finishedTransport = StringTransport(), StringTransport()
    for proto, transport in ((silent, silentTransport), (finished, finishedTransport)):
        directlyProvides(transport, ISSLTransport)
        proto.makeConnection(transport)
    finished.handshakeCompleted()
    clock.advance(10)
    assert silentTransport.value() == b"Error: request timeout\n" and silentTransport.disconnecting
    assert not finishedTransport.disconnecting


@pytest.mark.parametrize("ending", [b"Bye\n", b"x" * 5000, b"get 1\n" + b"y" * 5000])
def test_a_connection_the_server_ends_is_aborted_after_a_grace_period(ending: bytes) -> None:
    from kvtwist.server.protocol import CLOSE_GRACE

    proto, transport, clock = clocked()
    proto.dataReceived(ending)
    assert transport.disconnecting and not transport.disconnected
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected, "a client that does not take its last reply is cut off"


def test_the_grace_period_ends_with_the_connection() -> None:
    proto, transport, clock = clocked(idleTimeout=1)
    clock.advance(1)
    assert transport.value() == b"Error: idle timeout\n"
    proto.connectionLost()
    assert not clock.getDelayedCalls()


def test_a_refused_connection_is_aborted_after_a_grace_period() -> None:
    from kvtwist.server.protocol import CLOSE_GRACE

    clock = Clock()
    factory = KVFactory(newStore(), maxConnections=1, reactor=clock)
    factory.buildProtocol(None).makeConnection(StringTransport())
    refused, transport = factory.buildProtocol(None), StringTransport()
    refused.makeConnection(transport)
    assert transport.value() == b"Error: too many connections\n" and not transport.disconnected
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected


def test_unfinished_requests_are_scanned_once(monkeypatch) -> None:
    """Work, not time: the bytes looked at for CR/VT/FF stay linear in what was sent."""
    import kvtwist.server.protocol as protocol

    scanned = [0]
    real = protocol._NEEDS_CARE

    class Counting:
        def search(self, data: bytes, *args: int) -> object:
            scanned[0] += len(data)
            return real.search(data, *args)

    monkeypatch.setattr(protocol, "_NEEDS_CARE", Counting())
    size = 1 << 20
    proto, transport, clock = clocked(maxRequest=size + 10)
    request = b"get " + b"0" * (size - 6) + b"1\n"
    for start in range(0, len(request), 1000):
        proto.dataReceived(request[start : start + 1000])
    assert transport.value() == b"Key not found\n"
    assert scanned[0] <= 2 * len(request)


# Authentication

AUTH_CASES = [
    (b"get 1\n", b"Error: authentication required\n"),
    (b"put 1 2\ndel 1\n", b"Error: authentication required\n" * 2),
    (b"auth wrong\n", b"Error: invalid password\n"),
    (b"auth\n", b"Error: wrong number of arguments (usage: auth PASSWORD)\n"),
    (b"frob\n", b"Error: unknown command (expected put, get, del or Bye)\n"),
    (b"auth s3cret\nput 1 2\nget 1\n", b"OK\nOK\n2\n"),
    (b"AUTH s3cret\nget 1\n", b"OK\nKey not found\n"),
    (b"bye\n", b"Goodbye\n"),
]


@pytest.mark.parametrize("requests, replies", AUTH_CASES)
def test_a_password_must_come_first(requests: bytes, replies: bytes) -> None:
    proto, transport, clock = clocked(password=b"s3cret")
    proto.dataReceived(requests)
    assert transport.value() == replies


def test_wrong_passwords_end_the_connection() -> None:
    proto, transport, clock = clocked(password=b"s3cret")
    proto.dataReceived(b"auth a\nauth b\n")
    assert not transport.disconnecting
    proto.dataReceived(b"auth c\nauth s3cret\n")
    assert transport.value() == b"Error: invalid password\n" * 3
    assert transport.disconnecting


def test_auth_without_a_password_set_says_so() -> None:
    proto, transport, clock = clocked()
    proto.dataReceived(b"auth x\nput 1 2\n")
    assert transport.value() == b"Error: no password is set on this server\nOK\n"


def test_a_request_on_its_way_is_not_idle() -> None:
    proto, transport, clock = clocked(idleTimeout=5, requestTimeout=30)
    for _ in range(8):
        proto.dataReceived(b"0")
        clock.advance(1)
    proto.dataReceived(b"\n")
    assert transport.value() == b"Error: unknown command (expected put, get, del or Bye)\n"
    assert not transport.disconnecting


def test_log_connections_logs_each_open_and_close_with_its_reason() -> None:
    from twisted.logger import capturedLogs, formatEvent

    clock = Clock()
    factory = KVFactory(newStore(), reactor=clock, logConnections=True, idleTimeout=1)
    with capturedLogs() as events:
        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        first.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000)))
        second.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 4001)))
        first.dataReceived(b"get 1\nBye\n")
        first.connectionLost()
        clock.advance(1)
        second.connectionLost()
    lines = [formatEvent(e) for e in events]
    assert lines == [
        "kvstore: connection from 192.0.2.1:4000 opened",
        "kvstore: connection from 192.0.2.2:4001 opened",
        "kvstore: connection from 192.0.2.1:4000 closed: Bye (Connection was closed cleanly.)",
        "kvstore: connection from 192.0.2.2:4001 closed: idle timeout (Connection was closed cleanly.)",
    ]


def test_connections_are_not_logged_by_default() -> None:
    from twisted.logger import capturedLogs

    with capturedLogs() as events:
        proto, transport = connect()
        proto.dataReceived(b"get 1\nBye\n")
        proto.connectionLost()
    assert not list(events)


def test_a_client_that_does_not_take_its_replies_has_the_request_time() -> None:
    proto, transport, clock = clocked(requestTimeout=10)
    proto.dataReceived(b"get 1\n")
    proto.pauseProducing()  # the transport's send buffer is full
    clock.advance(9)
    proto.resumeProducing()  # the client read some: the clock starts over at the next pause
    proto.pauseProducing()
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value().endswith(b"Error: request timeout\n") and transport.disconnecting
    assert transport.producerState == "producing", "reading resumes, so that a TLS close can complete"


def test_a_paused_connection_that_resumes_keeps_no_clock() -> None:
    proto, transport, clock = clocked(requestTimeout=10)
    proto.pauseProducing()
    proto.resumeProducing()
    clock.advance(100)
    assert not transport.disconnecting


def test_replies_read_while_paused_do_not_stop_the_clock() -> None:
    """Over TLS, data decrypted before a pause still arrives after it."""
    proto, transport, clock = clocked(requestTimeout=10)
    proto.dataReceived(b"get 1\n")
    proto.pauseProducing()
    proto.dataReceived(b"get 2\n")
    clock.advance(10)
    assert transport.value().endswith(b"Error: request timeout\n")


def test_a_batch_delivered_after_the_connection_is_gone_is_dropped() -> None:
    from kvtwist.storage.interface import Batch

    proto, transport, clock = clocked()
    proto.connectionLost()
    proto.sendReplies(Batch(b"OK\n", last=True))
    assert transport.value() == b"" and not clock.getDelayedCalls()


def test_the_compiled_store_takes_the_compiled_path(storeKind: str) -> None:
    proto, transport = connect()
    assert (proto._compiled is not None) == (storeKind == "compiled")
    proto.dataReceived(b"put 1 2\nPUT 2 3\nget 1\r\nget 2\nbye\nget 1\n")
    assert transport.value() == b"OK\nOK\n2\n3\nGoodbye\n"

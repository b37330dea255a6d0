"""The wire protocol over a remote engine (``IRemoteStore``), through StringTransport.

The engine here is a dict that answers when the test says so, so that each
test can hold a chunk "at the engine" and check what the connection does
meanwhile: the same replies as in memory, in order, with reading paused.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import pytest
from hypothesis import given, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure

from kvtwist.server import stats as S
from kvtwist.server.factory import KVFactory
from kvtwist.server.protocol import KVProtocol
from kvtwist.storage.interface import (
    DELETE, GET, PUT, TIMED_OUT, EngineStats, IRemoteStore, Operation, Outcome, StoreUnavailable,
)

from kvtwist import compiled

from test_protocol import CONVERSATIONS, BAD_REQUESTS

# Every test here runs on both paths for remote engines: the protocol's own
# parser, and the compiled parseChunk/formatOutcomes where the extension is built.
PATHS = {"pure": None, "compiled": compiled.remotePath}


@pytest.fixture(autouse=True, params=list(PATHS))
def remotePath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "compiled" and PATHS["compiled"] is None:
        pytest.skip(f"no compiled path: {compiled.unavailable}")
    monkeypatch.setattr(compiled, "remotePath", PATHS[request.param])
    return request.param


class DictEngine:
    """A remote store over a dict; with ``hold``, each chunk waits until ``release``."""

    def __init__(self, hold: bool = False) -> None:
        self.data: dict[int, int] = {}
        self.hold = hold
        self.held: list[tuple[Sequence[Operation], defer.Deferred[list[Outcome]]]] = []
        self.stats = EngineStats()
        self.failing: str | None = None

    def execute(self, operations: Sequence[Operation]) -> defer.Deferred[list[Outcome]]:
        d: defer.Deferred[list[Outcome]] = defer.Deferred()
        self.held.append((list(operations), d))
        if not self.hold:
            self.release()
        return d

    def release(self) -> None:
        """Answer the oldest held chunk, applying it now."""
        operations, d = self.held.pop(0)
        d.callback([self._apply(op) for op in operations])

    def _apply(self, op: Operation) -> Outcome:
        if self.failing is not None:
            return StoreUnavailable(self.failing)
        if op.command == PUT:
            if op.key in self.data:
                return False
            self.data[op.key] = op.value
            return True
        if op.command == GET:
            return self.data.get(op.key)
        assert op.command == DELETE
        return self.data.pop(op.key, None) is not None

    def describe(self) -> str:
        return "dict://"


def connect(engine: DictEngine, **options) -> tuple[KVProtocol, StringTransport, KVFactory]:
    factory = KVFactory(engine, reactor=options.pop("reactor", Clock()), **options)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, factory


def test_the_test_engine_is_a_remote_store() -> None:
    assert isinstance(DictEngine(), IRemoteStore)
    factory = KVFactory(DictEngine())
    assert factory.remote is not None and factory.store is None


@pytest.mark.parametrize("requests, replies", CONVERSATIONS)
def test_the_same_conversations_as_in_memory(requests: bytes, replies: bytes) -> None:
    proto, transport, _ = connect(DictEngine())
    proto.dataReceived(requests)
    assert transport.value() == replies


@pytest.mark.parametrize("request_", BAD_REQUESTS)
def test_bad_input_never_reaches_the_engine(request_: bytes) -> None:
    engine = DictEngine()
    proto, transport, _ = connect(engine)
    proto.dataReceived(request_ + b"\n")
    assert transport.value().startswith(b"Error: ")
    assert engine.data == {} and engine.held == []


def test_replies_wait_for_the_engine_and_keep_their_order() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 10\nfoo\nget 1\nget x\ndel 1\n")
    assert transport.value() == b""
    assert engine.held[0][0] == [
        Operation(PUT, 1, 10), Operation(GET, 1), Operation(DELETE, 1),
    ]
    engine.release()
    assert transport.value() == (
        b"OK\nError: unknown command (expected put, get, del or Bye)\n10\n"
        b"Error: key must be a signed 64-bit decimal integer\nOK\n"
    )


def test_reading_pauses_when_more_comes_while_a_chunk_is_at_the_engine() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\n")
    # A client waiting for its replies costs no pause.
    assert transport.producerState == "producing"
    proto.dataReceived(b"get 1\n")
    assert transport.producerState == "paused"
    # Flow control resuming the connection does not resume reading early.
    proto.pauseProducing()
    proto.resumeProducing()
    assert transport.producerState == "paused"
    engine.release()
    # The held chunk went to the engine; reading resumed.
    assert transport.producerState == "producing" and len(engine.held) == 1
    engine.release()
    assert transport.value() == b"OK\n1\n"


def test_what_comes_meanwhile_is_run_after_in_order() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\n")
    proto.dataReceived(b"get 1\nfoo\n")
    proto.dataReceived(b"del 1\n")
    assert len(engine.held) == 1
    engine.release()
    assert transport.value() == b"OK\n"
    assert len(engine.held) == 1
    engine.release()
    assert transport.value() == b"OK\n1\nError: unknown command (expected put, get, del or Bye)\nOK\n"
    assert engine.data == {}


def test_bye_after_requests_closes_once_they_are_answered() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\nbye\nput 2 2\n")
    assert not transport.disconnecting
    engine.release()
    assert transport.value() == b"OK\nGoodbye\n"
    assert transport.disconnecting
    assert engine.data == {1: 1}


def test_end_of_input_while_at_the_engine_still_runs_the_last_request() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\nget")
    proto.dataReceived(b" 1")
    proto.readConnectionLost()
    engine.release()
    assert not transport.disconnecting
    engine.release()
    assert transport.value() == b"OK\n1\n"
    assert transport.disconnecting


def test_failed_operations_are_store_unavailable_and_counted() -> None:
    engine = DictEngine()
    engine.failing = TIMED_OUT
    proto, transport, factory = connect(engine)
    proto.dataReceived(b"put 1 1\nget 1\ndel 1\n")
    assert transport.value() == b"Error: store unavailable (timeout)\n" * 3
    assert not transport.disconnecting
    counts = factory.stats.requests
    for command in ("put", "get", "del"):
        assert counts[S.storeErrorKind(command, "unavailable")] == 1
    engine.failing = None
    transport.clear()
    proto.dataReceived(b"put 1 1\nget 1\n")
    assert transport.value() == b"OK\n1\n"
    assert counts[S.PUT_OK] == counts[S.GET_FOUND] == 1


def test_a_connection_lost_meanwhile_gets_nothing() -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\n")
    proto.connectionLost()
    engine.release()
    assert transport.value() == b""
    # The write itself did happen: the engine applied it.
    assert engine.data == {1: 1}


def test_a_timeout_meanwhile_comes_after_the_engines_replies() -> None:
    clock = Clock()
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine, reactor=clock, requestTimeout=5)
    proto.dataReceived(b"put 1 1\nget")
    clock.advance(6)
    assert transport.value() == b"" and not transport.disconnecting
    engine.release()
    assert transport.value() == b"OK\nError: request timeout\n"
    assert transport.disconnecting


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def test_an_engine_that_fails_a_chunk_ends_the_connection(logged: Sequence[LogEvent]) -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\nget 1\n")
    engine.held.pop(0)[1].errback(RuntimeError("engine bug"))
    assert transport.value() == b""
    assert transport.disconnecting
    [failure] = [event["log_failure"] for event in logged if "log_failure" in event]
    assert isinstance(failure, Failure) and failure.check(RuntimeError)


@pytest.mark.parametrize("outcomes", [[True], [True, 1, 2], [object(), 1]])
def test_answers_that_do_not_fit_the_chunk_end_the_connection(outcomes: list[Outcome], logged: Sequence[LogEvent]) -> None:
    engine = DictEngine(hold=True)
    proto, transport, _ = connect(engine)
    proto.dataReceived(b"put 1 1\nget 1\n")
    engine.held.pop(0)[1].callback(outcomes)
    assert transport.value() == b""
    assert transport.disconnecting
    assert any("log_failure" in event for event in logged)


def test_authentication_unlocks_the_remote_commands() -> None:
    engine = DictEngine()
    proto, transport, _ = connect(engine, password=b"sesame")
    proto.dataReceived(b"put 1 1\nauth sesame\nput 1 1\nget 1\n")
    assert transport.value() == b"Error: authentication required\nOK\nOK\n1\n"
    assert engine.data == {1: 1}


def test_the_compiled_path_is_taken_where_it_exists(remotePath: str) -> None:
    proto, _, _ = connect(DictEngine())
    assert (proto._remotePath is not None) == (remotePath == "compiled")


_LINES = st.sampled_from([
    b"put 1 2", b"put 1 3", b"get 1", b"del 1", b"get 2", b"put -9223372036854775808 9223372036854775807",
    b"get -9223372036854775808", b"PUT 2 5", b"get 2\r", b"get  1", b"put 1", b"frob", b"get 99999999999999999999",
    b"", b"del 2",
])


@given(st.lists(st.lists(_LINES, max_size=8), min_size=1, max_size=6), st.sampled_from(["\n", "\0"]))
def test_chunks_get_the_replies_a_dict_would_give(chunks: list[list[bytes]], end: str) -> None:
    """Whatever a chunk holds, each path answers as the in-memory store does, chunk by chunk."""
    from kvtwist.server.factory import KVFactory as Factory
    from kvtwist.storage.memory import MemoryStore

    memory = Factory(MemoryStore(), reactor=Clock()).buildProtocol(None)
    memoryTransport = StringTransport()
    memory.makeConnection(memoryTransport)
    proto, transport, _ = connect(DictEngine())
    for lines in chunks:
        data = b"".join(line + end.encode() for line in lines)
        proto.dataReceived(data)
        memory.dataReceived(data)
        assert transport.value() == memoryTransport.value()

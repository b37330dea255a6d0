"""
The Redis engine (kvtwist.engines.redis and redisnode) against real
``redis-server`` processes: semantics, pipelining, faults and TLS; then
real ``twistd kvstore --store redis://...`` nodes sharing one Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.application.service import IService
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kvtwist.compiled import respPath
from kvtwist.engines import EngineOptions, EngineURLError, openEngine
from kvtwist.engines import redis as redisEngine
from kvtwist.engines.redis import CommandEncoder, RedisStore, commandFor
from kvtwist.engines.redisnode import encodeCommands
from kvtwist.storage.interface import (
    DELETE,
    GET,
    OUTCOME_UNKNOWN,
    OVERLOADED,
    PUT,
    TIMED_OUT,
    IRemoteStore,
    Operation,
    Outcome,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
)
from redisprocs import RedisProcess, exchange, freePort, needsRedis, startRedis
from serverproc import ServerProcess, session, start_server
from serverproc import exchange as nodeExchange

pytestmark = needsRedis


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def blockRedis(redis: RedisProcess, seconds: float) -> socket.socket:
    """Make ``redis`` answer nobody for ``seconds`` (DEBUG SLEEP on a connection of its own); close the socket after."""
    sock = socket.create_connection(("127.0.0.1", redis.port))
    sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%s\r\n" % (len(str(seconds)), str(seconds).encode()))
    # Let Redis read it before the engine's commands arrive.
    time.sleep(0.05)
    return sock


@implementer(ILogObserver)
class LogLines:
    """The kvstore lines logged while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text.startswith("kvstore: store"):
            self.lines.append(text)

    def matching(self, word: str) -> list[str]:
        return [line for line in self.lines if word in line]


class EngineTestCase(TestCase):
    """Opens engines that the test's end stops, and Redis servers it kills."""

    def redis(self, *args: str) -> RedisProcess:
        server = startRedis("--enable-debug-command", "local", *args)
        self.addCleanup(server.close)
        return server

    async def store(self, url: str, **options: Any) -> RedisStore:
        store = openEngine(url, EngineOptions(**options), reactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    async def ops(self, store: RedisStore, *operations: Operation) -> list[Outcome]:
        return await store.execute(operations)


def P(key: int, value: int) -> Operation:
    return Operation(PUT, key, value)


def G(key: int) -> Operation:
    return Operation(GET, key)


def D(key: int) -> Operation:
    return Operation(DELETE, key)


def reasons(outcomes: Sequence[object]) -> set[str]:
    return {o.reason for o in outcomes if isinstance(o, StoreUnavailable)}


class SemanticsTests(EngineTestCase):
    """What each operation does to Redis, and what it answers."""

    async def test_theStoreIsARemoteStoreAndAService(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        self.assertIsInstance(store, IRemoteStore)
        verifyObject(IService, store)
        self.assertEqual(store.describe(), f"redis://127.0.0.1:{server.port}")

    async def test_putGetDeleteAndThePrefix(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        self.assertEqual(await self.ops(store, P(1, 10)), [True])
        self.assertEqual(await self.ops(store, P(1, 11)), [False])
        self.assertEqual(await self.ops(store, G(1)), [10])
        self.assertEqual(server.call("GET", "kvtwist:1"), b"10")
        self.assertEqual(await self.ops(store, P(-9223372036854775808, 9223372036854775807)), [True])
        self.assertEqual(server.call("GET", "kvtwist:-9223372036854775808"), b"9223372036854775807")
        self.assertEqual(await self.ops(store, G(-9223372036854775808)), [9223372036854775807])
        self.assertEqual(await self.ops(store, D(1)), [True])
        self.assertEqual(await self.ops(store, D(1)), [False])
        self.assertEqual(await self.ops(store, G(1)), [None])
        self.assertEqual(server.call("EXISTS", "kvtwist:1"), 0)
        self.assertEqual(store.stats.operations, 8)
        self.assertEqual(store.stats.errors, {})

    async def test_prefixesKeepApplicationsApart(self) -> None:
        server = self.redis()
        first = await self.store(f"redis://127.0.0.1:{server.port}", keyPrefix="app1:")
        second = await self.store(f"redis://127.0.0.1:{server.port}", keyPrefix="app2:")
        server.call("SET", "5", "99")
        self.assertEqual(await self.ops(first, P(5, 1)), [True])
        self.assertEqual(await self.ops(second, G(5), P(5, 2), G(5)), [None, True, 2])
        keys = server.call("KEYS", "*")
        assert isinstance(keys, list)
        self.assertEqual(sorted(keys), [b"5", b"app1:5", b"app2:5"])

    async def test_aChunkIsOnePipelineAnsweredInOrder(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        chunk = [P(1, 10), G(1), P(1, 11), D(1), G(1), P(1, 12), G(1), D(2), P(2, -2), G(2)]
        sends = store.stats.latency.count
        self.assertEqual(await self.ops(store, *chunk), [True, 10, False, True, None, True, 12, False, True, -2])
        self.assertEqual(store.stats.latency.count, sends + 1)
        keys = range(10, 2010)
        big = [P(k, -k) for k in keys] + [G(k) for k in reversed(keys)]
        self.assertEqual(await self.ops(store, *big), [True] * len(keys) + [-k for k in reversed(keys)])
        self.assertEqual(store.stats.latency.count, sends + 2)

    async def test_aValueThatIsNotA64BitIntegerIsAStoreError(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        for key, raw in enumerate([b"abc", b"007", b"+5", b" 5", b"-0", b"9223372036854775808", b"1_000", b"", b"\xff"]):
            server.call("SET", f"kvtwist:{key}", raw)
        server.call("HSET", "kvtwist:100", "a", "1")
        outcomes = await self.ops(store, *[G(key) for key in range(9)], G(100), P(200, 1), G(200))
        for key, outcome in enumerate(outcomes[:9]):
            self.assertIsInstance(outcome, StoreError, key)
            self.assertEqual(str(outcome), f"the store holds a value for key {key} that is not a 64-bit integer")
        self.assertIsInstance(outcomes[9], StoreError)
        self.assertIn("WRONGTYPE", str(outcomes[9]))
        self.assertEqual(outcomes[10:], [True, 1])
        self.assertEqual(store.stats.errors, {"bad value": 9, "redis WRONGTYPE": 1})

    async def test_aReadOnlyReplicaRefusesWritesAsReadOnly(self) -> None:
        primary = self.redis("--repl-diskless-sync-delay", "0")
        replica = self.redis("--replicaof", "127.0.0.1", str(primary.port))
        primary.call("SET", "kvtwist:1", "5")
        store = await self.store(f"redis://127.0.0.1:{replica.port}")
        deadline = time.monotonic() + 5
        while await self.ops(store, G(1)) != [5] and time.monotonic() < deadline:
            await sleep(0.05)
        outcomes = await self.ops(store, P(2, 1), G(1))
        self.assertIsInstance(outcomes[0], StoreReadOnly)
        self.assertEqual(outcomes[1], 5)

    async def test_passwordAndDatabase(self) -> None:
        server = self.redis("--requirepass", "s3cr:et")
        store = await self.store(f"redis://:s3cr%3Aet@127.0.0.1:{server.port}/3")
        self.assertNotIn("s3cr", store.describe())
        self.assertEqual(await self.ops(store, P(1, 2)), [True])
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            replies = exchange(sock, [("AUTH", "s3cr:et"), ("SELECT", 3), ("GET", "kvtwist:1"), ("SELECT", 0), ("DBSIZE",)])
        self.assertEqual(replies, [b"OK", b"OK", b"2", b"OK", 0])

    async def test_aWrongPasswordMakesTheStoreUnavailableAndSaysWhy(self) -> None:
        server = self.redis("--requirepass", "right")
        logs = LogLines(self)
        store = await self.store(f"redis://:wrong@127.0.0.1:{server.port}", timeout=5.0)
        started = time.monotonic()
        [outcome] = await self.ops(store, G(1))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIsInstance(outcome, StoreUnavailable)
        self.assertIn("WRONGPASS", str(outcome))
        await sleep(0.5)
        self.assertEqual(len(logs.matching("unavailable")), 1, logs.lines)
        self.assertNotIn("wrong", " ".join(logs.lines).replace("WRONGPASS", ""))


class PythonPathSemanticsTests(SemanticsTests):
    """The same, on the Python path alone (where the compiled RESP path is built, the tests above take it)."""

    def setUp(self) -> None:
        self.patch(redisEngine, "respPath", None)

    async def test_theStoreTakesThePythonPath(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        self.assertIsNone(store.compiled)


class CompiledPathTests(EngineTestCase):
    async def test_theStoreTakesTheCompiledPathWhereItIsBuilt(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}")
        self.assertIs(store.compiled, respPath)


class FaultTests(EngineTestCase):
    """Every request is answered within the timeout, whatever Redis does."""

    async def test_downAtStartFailsFastAndSaysWhy(self) -> None:
        logs = LogLines(self)
        port = freePort()
        store = await self.store(f"redis://127.0.0.1:{port}", timeout=5.0)
        started = time.monotonic()
        first = await self.ops(store, G(1), P(1, 1))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(reasons(first), {"connection refused"})
        self.assertEqual([str(o) for o in first], ["store unavailable (connection refused)"] * 2)
        # Once known down, a send is refused without waiting at all.
        later = store.execute([G(2)])
        self.assertTrue(later.called)
        refusedAtOnce: list[Outcome] = self.successResultOf(later)
        self.assertEqual(reasons(refusedAtOnce), {"connection refused"})
        self.assertEqual(store.node.unavailable, "connection refused")
        self.assertEqual(store.stats.unavailable, f"redis://127.0.0.1:{port}: connection refused")
        await sleep(1.0)
        self.assertEqual(logs.lines, [f"kvstore: store redis://127.0.0.1:{port} unavailable: connection refused"])
        self.assertEqual(store.stats.errors, {"connection refused": 3})

    async def test_killedDuringLoadAnswersWithinTheTimeoutAndRecovers(self) -> None:
        server = self.redis()
        logs = LogLines(self)
        timeout = 1.0
        store = await self.store(f"redis://127.0.0.1:{server.port}", timeout=timeout)
        slowest = 0.0
        outcomes: list[Outcome] = []
        stop = False

        async def client(base: int) -> None:
            nonlocal slowest
            key = base
            while not stop:
                started = time.monotonic()
                chunk = [P(key, key), G(key), D(key)] * 4
                outcomes.extend(await store.execute(chunk))
                slowest = max(slowest, time.monotonic() - started)
                key += 1
                await sleep(0.005)

        clients = gatherResults([Deferred.fromCoroutine(client(i * 1_000_000)) for i in range(8)])
        await sleep(0.3)
        self.assertNotIn(True, [isinstance(o, StoreError) for o in outcomes])
        server.kill()
        await sleep(1.0)
        failed = [o for o in outcomes if isinstance(o, StoreUnavailable)]
        self.assertTrue(failed)
        self.assertLessEqual(reasons(failed), {OUTCOME_UNKNOWN, "connection refused", "connection lost", TIMED_OUT})
        server.start()
        recovered = len(outcomes)
        await sleep(2.0)
        stop = True
        await clients
        self.assertLess(slowest, timeout + 0.5)
        tail = outcomes[-48:]
        self.assertGreater(len(outcomes), recovered + 48)
        self.assertFalse([o for o in tail if isinstance(o, StoreError)])
        self.assertIsNone(store.node.unavailable)
        self.assertIsNone(store.stats.unavailable)
        self.assertEqual(len(logs.matching("unavailable: connection refused")), 1, logs.lines)
        self.assertEqual(len(logs.matching("available again")), 1, logs.lines)
        self.assertEqual(store.node._pending, 0)

    async def test_aWriteWhoseAnswerNeverCameIsOutcomeUnknown(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}", timeout=3.0)
        self.assertEqual(await self.ops(store, G(0)), [None])
        blocker = blockRedis(server, 2)
        self.addCleanup(blocker.close)
        pending = store.execute([P(1, 1), G(1)])
        await sleep(0.2)
        self.assertFalse(pending.called)
        started = time.monotonic()
        server.kill()
        outcomes = await pending
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual([str(o) for o in outcomes], ["store unavailable (outcome unknown)"] * 2)
        self.assertEqual(store.stats.errors, {OUTCOME_UNKNOWN: 2})

    async def test_aSlowServerTimesOutAndTheNextRequestsAreRight(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}", timeout=0.5)
        self.assertEqual(await self.ops(store, P(1, 1)), [True])
        blocker = blockRedis(server, 1)
        self.addCleanup(blocker.close)
        started = time.monotonic()
        outcomes = await self.ops(store, P(2, 2), G(1))
        self.assertTrue(0.4 < time.monotonic() - started < 0.9)
        self.assertEqual(reasons(outcomes), {TIMED_OUT})
        await sleep(1.0)
        # The late replies are not taken for the answers of later requests.
        self.assertEqual(await self.ops(store, G(1), G(2), P(3, 3), G(3)), [1, 2, True, 3])
        self.assertEqual(store.node._pending, 0)

    async def test_tooManyWaitingIsRefusedAtOnce(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}", maxPending=8, timeout=3.0)
        self.assertEqual(await self.ops(store, G(0)), [None])
        blocker = blockRedis(server, 0.5)
        self.addCleanup(blocker.close)
        waiting = store.execute([P(k, k) for k in range(6)])
        refused: list[Outcome] = self.successResultOf(store.execute([G(1), G(2), G(3)]))
        self.assertEqual(reasons(refused), {OVERLOADED})
        fits = store.execute([G(1), G(2)])
        self.assertEqual(await waiting, [True] * 6)
        self.assertEqual(await fits, [1, 2])
        self.assertEqual(store.node._pending, 0)
        self.assertEqual(store.stats.errors, {OVERLOADED: 3})

    async def test_stopLetsSendsUnderWayFinish(self) -> None:
        server = self.redis()
        store = openEngine(f"redis://127.0.0.1:{server.port}", EngineOptions(timeout=3.0), reactor)
        store.startService()
        self.assertEqual(await self.ops(store, G(0)), [None])
        blocker = blockRedis(server, 0.3)
        self.addCleanup(blocker.close)
        under = store.execute([P(1, 1)])
        await store.stopService()
        self.assertEqual(self.successResultOf(under), [True])
        self.assertEqual(reasons(await self.ops(store, G(1))), {"store is not running"})


class PoolTests(EngineTestCase):
    """The connection pool: its size, and what it keeps while Redis is down."""

    async def test_aSmallPoolServesEveryone(self) -> None:
        server = self.redis()
        store = await self.store(f"redis://127.0.0.1:{server.port}", connections=3)
        chunks = [[P(k, k), G(k)] for k in range(200)]
        results = await gatherResults([store.execute(chunk) for chunk in chunks])
        self.assertEqual(results, [[True, k] for k in range(200)])
        clients = server.call("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        # Three of ours, and the one asking.
        self.assertEqual(len(clients.splitlines()), 4)

    def test_whileDownNothingGrows(self) -> None:
        from twisted.internet import error
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        from kvtwist.engines.redisnode import RedisNode
        from kvtwist.storage.interface import EngineStats

        clock = MemoryReactorClock()
        stats = EngineStats()
        node = RedisNode("127.0.0.1", 6379, EngineOptions(connections=2, timeout=2.0), clock, stats)
        node.startService()
        self.assertEqual(len(clock.tcpClients), 2)
        during = node.send([[b"GET", b"k"], [b"GET", b"j"]])
        # A connect is under way: the send may wait for it.
        self.assertNoResult(during)
        refused = 0

        def refuseNewAttempts() -> None:
            nonlocal refused
            for connector, (_, _, factory, _, _) in list(zip(clock.connectors, clock.tcpClients))[refused:]:
                factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))
                refused += 1

        refuseNewAttempts()
        failedAtOnce: list[object] = self.successResultOf(during)
        self.assertEqual(reasons(failedAtOnce), {"connection refused"})
        for _ in range(300):
            clock.advance(0.5)
            refuseNewAttempts()
            sent: list[object] = self.successResultOf(node.send([[b"GET", b"k"]]))
            self.assertEqual(reasons(sent), {"connection refused"})
        # One pending retry per connection, none further off than a second and a half.
        calls = clock.getDelayedCalls()
        self.assertEqual(len(calls), 2)
        self.assertTrue(all(call.getTime() - clock.seconds() <= 1.5 for call in calls))
        self.assertGreater(refused, 150)
        self.assertEqual((node._pending, node._live, len(node._waiting)), (0, 0, 0))
        self.assertEqual(node.unavailable, "connection refused")
        self.successResultOf(node.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_aSendThatNoConnectionTakesFailsAtTheTimeout(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from kvtwist.engines.redisnode import RedisNode
        from kvtwist.storage.interface import EngineStats

        clock = MemoryReactorClock()
        node = RedisNode("127.0.0.1", 6379, EngineOptions(connections=1, timeout=2.0), clock, EngineStats())
        node.startService()
        waiting = node.send([[b"PING"]])
        clock.advance(1.9)
        self.assertNoResult(waiting)
        clock.advance(0.1)
        late: list[object] = self.successResultOf(waiting)
        self.assertEqual(reasons(late), {"no connection within the timeout"})
        self.assertEqual((node._pending, len(node._waiting)), (0, 0))


def connectedNode(timeout: float = 2.0, connections: int = 1) -> tuple[Any, Any, list[Any], list[Any]]:
    """A RedisNode on a fake clock whose connections are StringTransports, past their PING: (node, clock, protocols, transports)."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from kvtwist.engines.redisnode import RedisNode
    from kvtwist.storage.interface import EngineStats

    clock = MemoryReactorClock()
    node = RedisNode("127.0.0.1", 6379, EngineOptions(connections=connections, timeout=timeout), clock, EngineStats())
    node.startService()
    protocols, transports = [], []
    for _, _, factory, _, _ in clock.tcpClients:
        wrapper = factory.buildProtocol(None)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        assert transport.value() == b"*1\r\n$4\r\nPING\r\n"
        transport.clear()
        wrapper.dataReceived(b"+PONG\r\n")
        protocols.append(wrapper)
        transports.append(transport)
    assert node.unavailable is None
    return node, clock, protocols, transports


class ClockTests(TestCase):
    """Every send is answered within the timeout by one clock per node, not one timer per send."""

    def test_aStuckSendTimesOutAtItsDeadline(self) -> None:
        node, clock, [protocol], [transport] = connectedNode(timeout=2.0)
        # The connection's last reply (its PONG) came before the send.
        clock.advance(1.0)
        first = node.send([[b"GET", b"a"], [b"GET", b"b"]])
        clock.advance(0)
        self.assertEqual(transport.value(), b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n")
        clock.advance(1.0)
        second = node.send([[b"GET", b"c"]])
        clock.advance(0.9)
        self.assertNoResult(first)
        clock.advance(0.1)
        self.assertEqual(reasons(self.successResultOf(first)), {TIMED_OUT})
        self.assertNoResult(second)
        # Nothing came back on the connection for a whole timeout: it is given up.
        self.assertTrue(transport.disconnecting)
        clock.advance(0.9)
        self.assertNoResult(second)
        clock.advance(0.1)
        self.assertEqual(reasons(self.successResultOf(second)), {TIMED_OUT})
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answeredSendsNeedNoTimerOfTheirOwn(self) -> None:
        node, clock, [protocol], [transport] = connectedNode(timeout=2.0)
        sends = [node.send([[b"GET", b"%d" % n]]) for n in range(100)]
        clock.advance(0)
        self.assertEqual(transport.value(), b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%d\r\n" % (len(b"%d" % n), n) for n in range(100)))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        protocol.dataReceived(b"$1\r\n7\r\n" * 60)
        self.assertEqual([self.successResultOf(d) for d in sends[:60]], [[b"7"]] * 60)
        clock.advance(1.5)
        late = node.send([[b"GET", b"x"]])
        protocol.dataReceived(b"$1\r\n8\r\n" * 39 + b"$1\r")
        self.assertNoResult(sends[99])
        clock.advance(0.5)
        # The oldest unanswered send was written at 0: it timed out at 2.
        self.assertEqual(reasons(self.successResultOf(sends[99])), {TIMED_OUT})
        self.assertNoResult(late)
        self.assertFalse(transport.disconnecting)
        # Its late reply is skipped, and the next one goes to the send it answers.
        protocol.dataReceived(b"\n8\r\n$1\r\n9\r\n")
        self.assertEqual(self.successResultOf(late), [b"9"])
        self.assertEqual((node._pending, node._live), (0, 0))
        clock.advance(2.0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_aSendMadeWhenTheClockRunsDoesNotDelayAnOlderOne(self) -> None:
        node, clock, [protocol], [transport] = connectedNode(timeout=2.0)
        retried: list[Deferred[list[object]]] = []

        def sendAgain(results: list[object]) -> list[object]:
            retried.append(node.send([[b"GET", b"a"]]))
            return results

        first = node.send([[b"GET", b"a"]])
        # Whoever hears of the first timeout sends again at once, which
        # arms the clock for that new send's deadline, at 4.
        first.addCallback(sendAgain)
        clock.advance(0.5)
        second = node.send([[b"GET", b"b"]])
        clock.advance(1.5)
        self.assertEqual(reasons(self.successResultOf(first)), {TIMED_OUT})
        self.assertEqual(len(retried), 1)
        clock.advance(0.5)
        self.assertEqual(reasons(self.successResultOf(second)), {TIMED_OUT})
        self.assertNoResult(retried[0])
        clock.advance(1.5)
        self.assertEqual(reasons(self.successResultOf(retried[0])), {TIMED_OUT})

    def test_stopCancelsTheClock(self) -> None:
        node, clock, [protocol], [transport] = connectedNode(timeout=2.0)
        sent = node.send([[b"PING"]])
        clock.advance(0)
        protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(self.successResultOf(sent), [b"PONG"])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        stopped = node.stopService()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])


class TLSTests(EngineTestCase):
    """``rediss://`` against a redis-server with a TLS port and a self-signed certificate."""

    def tlsRedis(self) -> tuple[RedisProcess, int, Path]:
        from tlscert import selfSignedPem

        directory = Path(tempfile.mkdtemp(prefix="kvtwist-redis-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        pem = selfSignedPem(directory)
        tlsPort = freePort()
        server = self.redis(
            "--tls-port", str(tlsPort), "--tls-cert-file", str(pem), "--tls-key-file", str(pem), "--tls-auth-clients", "no"
        )
        return server, tlsPort, pem

    async def test_rediss(self) -> None:
        server, tlsPort, pem = self.tlsRedis()
        store = await self.store(f"rediss://localhost:{tlsPort}?ca={pem}")
        self.assertEqual(await self.ops(store, P(1, 7), G(1), P(1, 8)), [True, 7, False])
        self.assertEqual(server.call("GET", "kvtwist:1"), b"7")

    async def test_aClientCertificateWhenTheServerAsksForOne(self) -> None:
        from tlscert import selfSignedPem

        directory = Path(tempfile.mkdtemp(prefix="kvtwist-redis-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        pem = selfSignedPem(directory)
        tlsPort = freePort()
        # The self-signed certificate is its own CA, so it serves as the client's too.
        self.redis("--tls-port", str(tlsPort), "--tls-cert-file", str(pem), "--tls-key-file", str(pem), "--tls-ca-cert-file", str(pem))
        store = await self.store(f"rediss://localhost:{tlsPort}?ca={pem}&cert={pem}")
        self.assertEqual(await self.ops(store, P(1, 7), G(1)), [True, 7])
        without = await self.store(f"rediss://localhost:{tlsPort}?ca={pem}", timeout=3.0)
        [outcome] = await self.ops(without, G(1))
        self.assertIsInstance(outcome, StoreUnavailable)

    async def test_anUntrustedCertificateIsRefused(self) -> None:
        server, tlsPort, pem = self.tlsRedis()
        logs = LogLines(self)
        store = await self.store(f"rediss://localhost:{tlsPort}", timeout=3.0)
        started = time.monotonic()
        [outcome] = await self.ops(store, P(1, 1))
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIsInstance(outcome, StoreUnavailable)
        self.assertIn("TLS", str(outcome))
        self.assertEqual(server.call("EXISTS", "kvtwist:1"), 0)
        self.assertEqual(len(logs.matching("unavailable")), 1, logs.lines)


@pytest.mark.parametrize(
    "url, says",
    [
        ("redis://127.0.0.1", "no port"),
        ("redis://:6379", "no host"),
        ("redis://127.0.0.1:99999", "out of range"),
        ("redis://127.0.0.1:port", "could not be cast"),
        ("redis://127.0.0.1:0", "port 0"),
        ("redis://127.0.0.1:6379/x", "database after / must be a number"),
        ("redis://127.0.0.1:6379/-1", "database after / must be a number"),
        ("redis://127.0.0.1:6379/1/2", "database after / must be a number"),
        ("redis://user@127.0.0.1:6379", "has no password"),
        ("redis://127.0.0.1:6379?ca=x.pem", "write rediss://"),
        ("rediss://127.0.0.1:6379?timeout=1", "unknown parameter 'timeout'"),
        ("rediss://127.0.0.1:6379?ca=", "needs a file name"),
        ("rediss://127.0.0.1:6379?ca=a&ca=b", "given twice"),
        ("rediss://127.0.0.1:6379?ca=/nonexistent/ca.pem", "cannot read the CA file"),
        ("redis://127.0.0.1:6379#x", "no #fragment"),
    ],
)
def test_badURLsAreOneClearLine(url: str, says: str) -> None:
    with pytest.raises(EngineURLError) as raised:
        openEngine(url, EngineOptions(), reactor)
    assert says in str(raised.value)
    assert "\n" not in str(raised.value)


def test_theErrorNeverShowsThePassword() -> None:
    with pytest.raises(EngineURLError) as raised:
        openEngine("redis://admin:hunter2@127.0.0.1:6379/x", EngineOptions(), reactor)
    assert "hunter2" not in str(raised.value)
    assert "redis://admin:***@127.0.0.1:6379/x" in str(raised.value)


def test_aCAFileWithoutCertificatesIsRefused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(EngineURLError, match="holds no PEM certificate"):
        openEngine(f"rediss://localhost:6379?ca={ca}", EngineOptions(), reactor)


@pytest.mark.parametrize(
    "url, described",
    [
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("redis://:pw@127.0.0.1:6379/2", "redis://:***@127.0.0.1:6379/2"),
        ("redis://me:pw@[::1]:6379", "redis://me:***@[::1]:6379"),
    ],
)
def test_describeShowsNoPassword(url: str, described: str) -> None:
    assert openEngine(url, EngineOptions(), reactor).describe() == described


@pytest.mark.parametrize("prefix", [b"kvtwist:", b"", b"{app}:", b"100%d%b%%:", "k\u00e9y\r\n".encode()])
def test_templatesEncodeWhatEncodeCommandsDoes(prefix: bytes) -> None:
    extremes = [0, 1, -1, 9, 10, -10, 2**63 - 1, -(2**63), 123456789]
    operations = [Operation(GET, key) for key in extremes] + [Operation(DELETE, key) for key in extremes]
    operations += [Operation(PUT, key, value) for key in extremes for value in extremes]
    encoded = CommandEncoder(prefix).encode(operations)
    assert encoded == [encodeCommands([commandFor(operation, prefix + b"%d" % operation.key)]) for operation in operations]


def test_theEncoderRefusesAnUnknownCommand() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        CommandEncoder(b"p:").encode([Operation(GET, 1), Operation(7, 1)])


# Real ``twistd kvstore --store redis://...`` nodes.


def kvtwistCheck() -> str:
    return str(Path(sys.executable).with_name("kvtwist-check"))


@pytest.fixture(scope="module")
def sharedRedis() -> Iterator[tuple[RedisProcess, ServerProcess, ServerProcess]]:
    """One Redis and two nodes that keep their data in it."""
    redis = startRedis()
    url = f"redis://127.0.0.1:{redis.port}/1"
    first = start_server("--store", url, "--key-prefix", "shared:")
    second = start_server("--store", url, "--key-prefix", "shared:")
    try:
        yield redis, first, second
    finally:
        first.stop()
        second.stop()
        redis.close()


def test_aNodeAnswersThroughRedis(sharedRedis: tuple[RedisProcess, ServerProcess, ServerProcess]) -> None:
    redis, first, _ = sharedRedis
    replies = session(first, b"put 41 +007\nput 41 8\nget 41\nget 42\ndel 41\ndel 41\nput 42 -9\n")
    assert replies == b"OK\nKey already exists\n7\nKey not found\nOK\nKey not found\nOK\nGoodbye\n"
    with socket.create_connection(("127.0.0.1", redis.port)) as sock:
        assert exchange(sock, [("SELECT", 1), ("GET", "shared:42"), ("EXISTS", "shared:41")]) == [b"OK", b"-9", 0]
    assert f"store: redis://127.0.0.1:{redis.port}/1" in first.log_text()


def test_twoNodesShareOneRedis(sharedRedis: tuple[RedisProcess, ServerProcess, ServerProcess]) -> None:
    _, first, second = sharedRedis
    assert session(first, b"put 51 1\n") == b"OK\nGoodbye\n"
    assert session(second, b"get 51\nput 51 2\ndel 51\n") == b"1\nKey already exists\nOK\nGoodbye\n"
    assert session(first, b"get 51\n") == b"Key not found\nGoodbye\n"


def test_kvtwistCheckPassesAcrossBothNodes(sharedRedis: tuple[RedisProcess, ServerProcess, ServerProcess]) -> None:
    _, first, second = sharedRedis
    nodes = [f"{node.host}:{node.port}" for node in (first, second)]
    done = subprocess.run([kvtwistCheck(), *nodes, "--duration", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all passed" in done.stdout
    assert "linearizable" in done.stdout


def test_aNodeSurvivesRedisDyingUnderLoad() -> None:
    redis = startRedis()
    node = start_server("--store", f"redis://127.0.0.1:{redis.port}", "--store-timeout", "1")
    slowest = [0.0]
    replies: list[bytes] = []
    stop = threading.Event()

    def client(base: int) -> None:
        with node.connect(timeout=10) as sock:
            key = base
            while not stop.is_set():
                chunk = b"".join(b"put %d %d\nget %d\n" % (k, k, k) for k in range(key, key + 8))
                started = time.monotonic()
                got = nodeExchange(sock, chunk, 16)
                slowest[0] = max(slowest[0], time.monotonic() - started)
                replies.extend(got.splitlines())
                key += 8

    try:
        threads = [threading.Thread(target=client, args=(i * 1_000_000,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert replies and not [r for r in replies if r.startswith(b"Error")]
        redis.kill()
        time.sleep(1.5)
        failed = [r for r in replies if r.startswith(b"Error")]
        assert failed and all(r.startswith(b"Error: store unavailable (") for r in failed)
        redis.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [r for r in replies[-64:] if r.startswith(b"Error")]:
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive(), "a client hung"
        assert not [r for r in replies[-64:] if r.startswith(b"Error")]
        assert slowest[0] < 2.0
        assert session(node, b"put 1 1\nget 1\n") == b"OK\n1\nGoodbye\n"
    finally:
        stop.set()
        node.stop()
        redis.close()
    log = node.log_text()
    assert log.count(f"store redis://127.0.0.1:{redis.port} unavailable:") == 1, log
    assert log.count(f"store redis://127.0.0.1:{redis.port} available again") == 1, log


def test_aNodeWhoseRedisIsDownAnswersAtOnce() -> None:
    port = freePort()
    node = start_server("--store", f"redis://127.0.0.1:{port}", "--store-timeout", "5")
    try:
        with node.connect() as sock:
            nodeExchange(sock, b"get 1\n", 1)
            started = time.monotonic()
            replies = nodeExchange(sock, b"get 1\nput 1 1\n", 2)
            assert time.monotonic() - started < 1.0
        assert replies == b"Error: store unavailable (connection refused)\n" * 2
    finally:
        node.stop()
    assert node.log_text().count("unavailable: connection refused") == 1

"""
The etcd engine (kvtwist/engines/etcd.py) against real etcd clusters.

The engine tests drive an ``EtcdStore`` on the real reactor
(``twisted.trial.unittest.TestCase`` returning Deferreds) against etcd
processes from tests/etcdprocs.py; faults are real too: members killed
(SIGKILL) or frozen (SIGSTOP). The process tests at the end run real
``twistd -n kvstore --store etcd://...`` nodes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import IService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from etcdprocs import EtcdCluster, etcd_get_raw, etcd_put_raw, requires_etcd, start_cluster
from kvtwist.check.history import Operation as HistoryOperation
from kvtwist.check.linearizability import checkHistory
from kvtwist.engines import EngineOptions, EngineURLError, openEngine
from kvtwist.engines.etcd import CONNECTION_LOST, EtcdStore, fromURL, parseMembers
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
    StoreUnavailable,
)
from serverproc import ServerProcess, session, start_server

reactor: Any = _reactor

pytestmark = requires_etcd

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(scope="module")
def sharedCluster() -> Iterator[EtcdCluster]:
    """One cluster for the tests that leave its members alone; each test uses its own key prefix."""
    cluster = start_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()


def _reply(command: int, outcome: Outcome) -> str:
    """The protocol reply an outcome becomes, for the linearizability checker."""
    if isinstance(outcome, StoreError):
        return f"Error: {outcome}"
    if command == GET:
        return "Key not found" if outcome is None else str(outcome)
    if command == PUT:
        return "OK" if outcome else "Key already exists"
    return "OK" if outcome else "Key not found"


_VERBS = {PUT: "put", GET: "get", DELETE: "del"}


class _LogCapture:
    """The engine's outage lines, as formatted text."""

    def __init__(self, test: TestCase) -> None:
        self.lines: list[str] = []
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def _observe(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text.startswith("kvstore: store etcd://"):
            self.lines.append(text)

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


def _ourConnections(ports: set[int]) -> int:
    """How many TCP connections this process has open to ``ports`` on loopback (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remotePort = int(fields[2].rsplit(":", 1)[1], 16)
                # 01: ESTABLISHED
                if fields[3] == "01" and remotePort in ports and fields[9] in inodes:
                    count += 1
    return count


class _EngineTest(TestCase):
    timeout = 30

    cluster: EtcdCluster

    def setUp(self) -> None:
        self.prefix = f"test-{uuid.uuid4().hex[:8]}:"

    def openStore(self, url: str | None = None, **options: Any) -> EtcdStore:
        options.setdefault("keyPrefix", self.prefix)
        store = fromURL(url or self.cluster.url, EngineOptions(**options), reactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def ownCluster(self) -> EtcdCluster:
        """A cluster this test may break; stopped after the test."""
        cluster = start_cluster(3)
        self.addCleanup(cluster.stop)
        self.cluster = cluster
        return cluster


class SemanticsTests(_EngineTest):
    """The three commands, each one atomic etcd operation, on a healthy cluster."""

    @pytest.fixture(autouse=True)
    def _cluster(self, sharedCluster: EtcdCluster) -> None:
        self.cluster = sharedCluster

    def test_isRemoteStoreAndService(self) -> None:
        store = self.openStore()
        self.assertIsInstance(store, IRemoteStore)
        self.assertTrue(IService.providedBy(store))
        self.assertEqual(store.describe(), self.cluster.url)

    @inlineCallbacks
    def test_commands(self) -> Generator[Deferred[Any], Any, None]:
        store = self.openStore()
        outcomes = yield store.execute(
            [
                Operation(PUT, 1, 10),
                Operation(PUT, 2, INT64_MIN),
                Operation(PUT, INT64_MAX, INT64_MAX),
                Operation(PUT, -7, 0),
            ]
        )
        self.assertEqual(outcomes, [True, True, True, True])
        outcomes = yield store.execute(
            [
                Operation(PUT, 1, 11),
                Operation(GET, 1),
                Operation(GET, 2),
                Operation(GET, INT64_MAX),
                Operation(GET, -7),
                Operation(GET, 3),
                Operation(DELETE, 2),
                Operation(DELETE, 3),
            ]
        )
        self.assertEqual(outcomes, [False, 10, INT64_MIN, INT64_MAX, 0, None, True, False])
        outcomes = yield store.execute([Operation(GET, 2), Operation(DELETE, 2), Operation(GET, 1)])
        self.assertEqual(outcomes, [None, False, 10])
        self.assertEqual(store.stats.operations, 15)
        self.assertEqual(store.stats.errors, {})
        self.assertEqual(store.stats.latency.count, 3)

    @inlineCallbacks
    def test_keysAreThePrefixAndDecimalKey(self) -> Generator[Deferred[Any], Any, None]:
        """Keys are the prefix and the decimal key, values canonical decimal: other programs can read them."""
        store = self.openStore()
        other = self.openStore(keyPrefix=self.prefix + "other:")
        yield store.execute([Operation(PUT, -5, -9), Operation(PUT, 6, 42)])
        self.assertEqual(etcd_get_raw(self.cluster, f"{self.prefix}-5".encode()), b"-9")
        self.assertEqual(etcd_get_raw(self.cluster, f"{self.prefix}6".encode()), b"42")
        outcomes = yield other.execute([Operation(GET, -5), Operation(PUT, 6, 1), Operation(GET, 6)])
        self.assertEqual(outcomes, [None, True, 1])
        outcomes = yield store.execute([Operation(GET, 6)])
        self.assertEqual(outcomes, [42])

    @inlineCallbacks
    def test_sameKeyInOrderWithinAChunk(self) -> Generator[Deferred[Any], Any, None]:
        """
        Operations on one key run in the order given, even though the chunk's
        operations go out at once; many keys interleaved, so that running
        them unordered would show.
        """
        store = self.openStore(connections=8)
        keys = range(100, 120)
        sequence = [(PUT, 7), (GET, 0), (DELETE, 0), (GET, 0), (PUT, 8), (GET, 0), (PUT, 9)]
        expected = [True, 7, True, None, True, 8, False]
        # One key's operations side by side, then all keys' interleaved.
        sideBySide = [Operation(command, key, value) for key in keys for command, value in sequence]
        interleaved = [Operation(command, key + 100, value) for command, value in sequence for key in keys]
        for operations in (sideBySide, interleaved):
            outcomes = yield store.execute(operations)
            for key in {operation.key for operation in operations}:
                self.assertEqual([outcomes[i] for i, op in enumerate(operations) if op.key == key], expected)

    @inlineCallbacks
    def test_concurrentPutsIfAbsentStoreOne(self) -> Generator[Deferred[Any], Any, None]:
        """Two nodes' engines, forty chunks each, all putting one key at once: exactly one is stored."""
        first, second = self.openStore(), self.openStore()
        chunks = [(first if value % 2 else second).execute([Operation(PUT, 77, value)]) for value in range(80)]
        results = yield gatherResults(chunks)
        outcomes = [outcome for (outcome,) in results]
        self.assertEqual((outcomes.count(True), outcomes.count(False)), (1, 79), outcomes)
        self.assertEqual((yield first.execute([Operation(GET, 77)])), [outcomes.index(True)])

    @inlineCallbacks
    def test_storedValueThatIsNotAnInteger(self) -> Generator[Deferred[Any], Any, None]:
        """A value another program put under the prefix is an error for that key only, with a clear text."""
        store = self.openStore()
        bad = {1: b"five", 2: b"007", 3: b"9223372036854775808", 4: b"-0", 5: b"", 6: b"1 "}
        for key, raw in bad.items():
            etcd_put_raw(self.cluster, f"{self.prefix}{key}".encode(), raw)
        outcomes = yield store.execute([Operation(GET, key) for key in bad] + [Operation(PUT, 9, 3), Operation(GET, 9)])
        for key, outcome in zip(bad, outcomes):
            self.assertIsInstance(outcome, StoreError)
            self.assertNotIsInstance(outcome, StoreUnavailable)
            self.assertIn(f"the value etcd holds for key {key} is not a 64-bit integer", str(outcome))
        self.assertEqual(outcomes[len(bad) :], [True, 3])
        outcomes = yield store.execute([Operation(PUT, 1, 5), Operation(DELETE, 1), Operation(GET, 1)])
        self.assertEqual(outcomes, [False, True, None])

    @inlineCallbacks
    def test_requestsShareFewConnections(self) -> Generator[Deferred[Any], Any, None]:
        """
        Sixty-four operations from sixteen chunks at once use at most
        ``connections`` connections per member, and stopping the service
        closes them.
        """
        if not os.path.exists("/proc/self/net/tcp"):
            raise pytest.skip("counting connections needs Linux /proc")
        store = self.openStore(connections=2)
        ports = {member.clientPort for member in self.cluster.members}
        seen = []

        def sample() -> None:
            seen.append(_ourConnections(ports))

        chunks = [store.execute([Operation(PUT, 4 * c + i, i) for i in range(4)]) for c in range(16)]
        sampling = [reactor.callLater(0.002 * i, sample) for i in range(30)]
        outcomes = yield gatherResults(chunks)
        for call in sampling:
            if call.active():
                call.cancel()
        sample()
        self.assertEqual(outcomes, [[True] * 4] * 16)
        self.assertGreaterEqual(max(seen), 1)
        self.assertLessEqual(max(seen), 2, seen)
        yield store.stopService()
        self.assertEqual(_ourConnections(ports), 0)

    @inlineCallbacks
    def test_overloadedRefusesAtOnce(self) -> Generator[Deferred[Any], Any, None]:
        store = self.openStore(maxPending=8)
        first = store.execute([Operation(PUT, key, key) for key in range(6)])
        refused = store.execute([Operation(GET, key) for key in range(3)])
        # Refused at once, without waiting for etcd.
        self.assertTrue(refused.called)
        outcomes = yield refused
        self.assertEqual([outcome.reason for outcome in outcomes], [OVERLOADED] * 3)
        self.assertEqual((yield first), [True] * 6)
        outcomes = yield store.execute([Operation(GET, key) for key in range(8)])
        self.assertEqual(outcomes, list(range(6)) + [None, None])
        self.assertEqual(store.stats.errors, {OVERLOADED: 3})


class URLTests(TestCase):
    def test_members(self) -> None:
        self.assertEqual(parseMembers("etcd://127.0.0.1:2379"), [("127.0.0.1", 2379)])
        self.assertEqual(
            parseMembers("etcd://a.example:1, b.example:2,[::1]:3/"),
            [("a.example", 1), ("b.example", 2), ("::1", 3)],
        )
        self.assertEqual(parseMembers("etcd://db"), [("db", 2379)])

    def test_badURLs(self) -> None:
        bad = [
            "etcd://",
            "etcd://host:",
            "etcd://host:0",
            "etcd://host:65536",
            "etcd://host:x",
            "etcd://host:1,,host:2",
            "etcd://host:1,host:1",
            "etcd://::1:2379",
            "etcd://[::1",
            "etcd://user:pw@host:1",
            "etcd://host:1/prefix",
            "etcd://host:1?x=1",
            "etcd:/host:1",
        ]
        for url in bad:
            with self.assertRaises(EngineURLError, msg=url) as raised:
                openEngine(url, EngineOptions(), reactor)
            text = str(raised.exception)
            self.assertNotIn("\n", text)
            self.assertIn(repr(url), text)


class FaultTests(_EngineTest):
    """Members that die or freeze, on a cluster of the test's own."""

    @inlineCallbacks
    def test_allMembersDownThenBack(self) -> Generator[Deferred[Any], Any, None]:
        """
        With every member killed each request gets "store unavailable" at
        once, not after a hang; the outage is logged once, its end once,
        and the data is there again after the restart.
        """
        cluster = self.ownCluster()
        log = _LogCapture(self)
        store = self.openStore(timeout=1.0)
        self.assertEqual((yield store.execute([Operation(PUT, 1, 11)])), [True])
        for index in range(3):
            cluster.kill(index)
        # Let the reactor see the killed members close their connections.
        yield deferLater(reactor, 0.05, lambda: None)
        for _ in range(3):
            started = time.monotonic()
            outcomes = yield store.execute([Operation(GET, 1), Operation(PUT, 2, 2)])
            self.assertLess(time.monotonic() - started, 0.5)
            self.assertEqual([outcome.reason for outcome in outcomes], ["connection refused"] * 2)
        self.assertEqual(store.stats.unavailable, "connection refused")
        self.assertEqual(log.count("unavailable: connection refused$"), 1)
        yield deferToThread(cluster.restart, 0, 1, 2)
        outcomes = yield store.execute([Operation(GET, 1), Operation(PUT, 2, 2)])
        self.assertEqual(outcomes, [11, True])
        self.assertIsNone(store.stats.unavailable)
        self.assertEqual(log.count("available again$"), 1)
        self.assertEqual(len(log.lines), 2, log.lines)

    @inlineCallbacks
    def test_allMembersFrozen(self) -> Generator[Deferred[Any], Any, None]:
        """Members that accept connections but never answer: every outcome within the timeout, no hang."""
        cluster = self.ownCluster()
        log = _LogCapture(self)
        store = self.openStore(timeout=0.5)
        self.assertEqual((yield store.execute([Operation(PUT, 1, 11)])), [True])
        for member in cluster.members:
            member.pause()
        for member in cluster.members:
            self.addCleanup(member.resume)
        started = time.monotonic()
        outcomes = yield store.execute([Operation(GET, 1), Operation(PUT, 2, 2), Operation(GET, 2)])
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 0.8)
        # The put reached a member (its connection was open), so it may have happened.
        self.assertEqual([outcome.reason for outcome in outcomes], [TIMED_OUT, OUTCOME_UNKNOWN, TIMED_OUT])
        self.assertEqual(log.count("unavailable: timeout$"), 1)
        for member in cluster.members:
            member.resume()
        # Thawed members may hold an election first; the timeout is short.
        yield deferToThread(cluster.wait_healthy)
        outcomes = yield store.execute([Operation(GET, 1)])
        self.assertEqual(outcomes, [11])
        self.assertEqual(log.count("available again$"), 1)

    @inlineCallbacks
    def test_frozenMemberIsLeftForTheNext(self) -> Generator[Deferred[Any], Any, None]:
        """
        With one connection per member and the first member frozen: the
        sent write is "outcome unknown", the write still waiting for the
        connection "timeout" (it never left), and the next chunk goes to
        another member.
        """
        cluster = self.ownCluster()
        # A follower first, so that freezing it forces no election.
        leader = cluster.leader_index()
        follower = cluster.members[(leader + 1) % 3]
        others = [member.address for member in cluster.members if member is not follower]
        store = self.openStore(url=f"etcd://{follower.address},{','.join(others)}", timeout=0.5, connections=1)
        self.assertEqual((yield store.execute([Operation(PUT, 1, 11)])), [True])
        follower.pause()
        self.addCleanup(follower.resume)
        outcomes = yield store.execute([Operation(PUT, 2, 2), Operation(PUT, 3, 3), Operation(GET, 1)])
        self.assertEqual([outcome.reason for outcome in outcomes], [OUTCOME_UNKNOWN, TIMED_OUT, TIMED_OUT])
        started = time.monotonic()
        outcomes = yield store.execute([Operation(PUT, 3, 3), Operation(GET, 1)])
        self.assertEqual(outcomes, [True, 11])
        self.assertLess(time.monotonic() - started, 0.4)

    @inlineCallbacks
    def test_oneMemberKilledUnderLoad(self) -> Generator[Deferred[Any], Any, None]:
        """
        Sixteen clients (chunks of 8) run for two seconds while the member
        the engine uses is killed: the engine fails over, keeps serving,
        the history of the shared keys is linearizable, and every put
        answered OK is readable with its value afterwards.
        """
        cluster = self.ownCluster()
        store = self.openStore(timeout=2.0, connections=4)
        history: list[HistoryOperation] = []
        acknowledged: dict[int, int] = {}
        served = {"before": 0, "after": 0}
        killedAt: list[float] = []
        deadline = time.monotonic() + 2.0

        @inlineCallbacks
        def client(number: int) -> Generator[Deferred[Any], Any, None]:
            sequence = 0
            while time.monotonic() < deadline:
                operations = []
                for _ in range(4):
                    sequence += 1
                    # A key of its own, put once: "no acknowledged write is lost".
                    operations.append(Operation(PUT, 1_000_000 * (number + 1) + sequence, sequence))
                    # A few shared keys: the linearizability check.
                    shared = (sequence * 7 + number) % 5
                    command = (PUT, GET, DELETE, GET)[(sequence + number) % 4]
                    operations.append(Operation(command, shared, number * 10_000 + sequence if command == PUT else 0))
                call = time.monotonic()
                outcomes = yield store.execute(operations)
                ret = time.monotonic()
                for operation, outcome in zip(operations, outcomes):
                    if operation.key >= 1_000_000:
                        if outcome is True:
                            acknowledged[operation.key] = operation.value
                        continue
                    value = operation.value if operation.command == PUT else None
                    reply = _reply(operation.command, outcome)
                    history.append(
                        HistoryOperation(number, _VERBS[operation.command], operation.key, value, call, ret, reply)
                    )
                    if not isinstance(outcome, StoreError):
                        served["after" if killedAt and call > killedAt[0] + 0.5 else "before"] += 1

        clients: list[Deferred[None]] = [client(number) for number in range(16)]
        yield deferLater(reactor, 0.6, lambda: None)
        killedAt.append(time.monotonic())
        yield deferToThread(cluster.kill, 0)
        yield gatherResults(clients)

        self.assertGreater(served["before"], 50)
        # Served by the other members long after the kill.
        self.assertGreater(served["after"], 50, (served, store.stats.errors))
        verdicts = checkHistory(history, minimizeSeconds=5)
        self.assertTrue(all(verdict.linearizable for verdict in verdicts), [v for v in verdicts if not v.linearizable])
        reader = self.openStore(url="etcd://" + ",".join(m.address for m in cluster.members[1:]))
        keys = sorted(acknowledged)
        outcomes = yield reader.execute([Operation(GET, key) for key in keys])
        lost = [(key, acknowledged[key], got) for key, got in zip(keys, outcomes) if got != acknowledged[key]]
        self.assertEqual(lost, [])
        self.assertGreater(len(keys), 200)
        unexpected = [
            reason
            for reason in store.stats.errors
            if reason not in (OUTCOME_UNKNOWN, TIMED_OUT, CONNECTION_LOST) and not reason.startswith("etcd: ")
        ]
        self.assertEqual(unexpected, [])




@pytest.fixture
def twoNodes(sharedCluster: EtcdCluster) -> Iterator[tuple[EtcdCluster, ServerProcess, ServerProcess, str]]:
    """Two kvtwist nodes sharing one etcd cluster, with a key prefix of their own."""
    prefix = f"nodes-{uuid.uuid4().hex[:8]}:"
    nodes = []
    try:
        for _ in range(2):
            nodes.append(
                start_server("--store", sharedCluster.url, "--key-prefix", prefix, "--store-timeout", "2")
            )
        yield sharedCluster, nodes[0], nodes[1], prefix
    finally:
        for node in nodes:
            node.stop()


def _check(*nodes: ServerProcess, duration: float = 2.0) -> subprocess.CompletedProcess[str]:
    checker = str(Path(sys.executable).with_name("kvtwist-check"))
    addresses = [f"{node.host}:{node.port}" for node in nodes]
    return subprocess.run(
        [checker, *addresses, "--duration", str(duration), "--clients", "16"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_nodeRepliesThroughEtcd(twoNodes: tuple[EtcdCluster, ServerProcess, ServerProcess, str]) -> None:
    cluster, node, _, prefix = twoNodes
    replies = session(node, b"put 1 +0005\nput 1 6\nget 001\nget 2\ndel 1\ndel 1\nget 1\n")
    assert replies == b"OK\nKey already exists\n5\nKey not found\nOK\nKey not found\nKey not found\nGoodbye\n"
    session(node, b"put -3 -4\n")
    assert etcd_get_raw(cluster, f"{prefix}-3".encode()) == b"-4"


def test_writeOnOneNodeVisibleOnTheOther(twoNodes: tuple[EtcdCluster, ServerProcess, ServerProcess, str]) -> None:
    _, first, second, _ = twoNodes
    assert session(first, b"put 10 100\n") == b"OK\nGoodbye\n"
    assert session(second, b"get 10\nput 10 1\ndel 10\n") == b"100\nKey already exists\nOK\nGoodbye\n"
    assert session(first, b"get 10\n") == b"Key not found\nGoodbye\n"


def test_checkerAcrossTwoNodes(twoNodes: tuple[EtcdCluster, ServerProcess, ServerProcess, str]) -> None:
    _, first, second, _ = twoNodes
    result = _check(first, second)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkerAcrossTwoNodesWhileAMemberDies(tmp_path: Path) -> None:
    """
    kvtwist-check across two nodes passes while the etcd member both nodes
    use is killed during its concurrent workload: the history stays
    linearizable (replies of unknown outcome are allowed, wrong ones not).
    """
    cluster = start_cluster(3)
    nodes = []
    try:
        for _ in range(2):
            nodes.append(start_server("--store", cluster.url, "--store-timeout", "2"))
        progress = tmp_path / "progress.txt"
        with open(progress, "w") as stderr:
            checker = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("kvtwist-check")),
                    *(f"{node.host}:{node.port}" for node in nodes),
                    "--duration", "3", "--clients", "16",
                ],
                stdout=subprocess.PIPE, stderr=stderr, text=True,
            )  # fmt: skip
        # The single-connection checks want exact replies; the kill belongs in the workload.
        deadline = time.monotonic() + 30
        while "concurrency: 16 clients" not in progress.read_text() and checker.poll() is None:
            assert time.monotonic() < deadline, progress.read_text()
            time.sleep(0.05)
        time.sleep(1.0)
        cluster.kill(0)
        stdout, _ = checker.communicate(timeout=60)
        assert checker.returncode == 0, stdout + progress.read_text()
        assert "concurrency: linearizability" in progress.read_text()
    finally:
        for node in nodes:
            node.stop()
        cluster.stop()

"""
The redis-cluster engine (kvtwist.engines.rediscluster) against a real
three-master Redis Cluster: routing, reply order, MOVED and ASK while a slot
moves under load, a master that stops answering or dies, and two kvtwist
servers sharing one cluster.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from binascii import crc_hqx
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import redisclusterprocs
from kvtwist.compiled import respPath
from kvtwist.engines import EngineOptions, EngineURLError, openEngine
from kvtwist.engines import rediscluster
from kvtwist.engines.rediscluster import RedisClusterStore, fromURL, keySlot, parseClusterSlots
from kvtwist.storage.interface import (
    DELETE,
    GET,
    OUTCOME_UNKNOWN,
    PUT,
    TIMED_OUT,
    IRemoteStore,
    Operation,
    StoreError,
    StoreUnavailable,
)
from serverproc import exchange, start_server

MAX = 2**63 - 1
MIN = -(2**63)
CHECKER = str(Path(sys.executable).with_name("kvtwist-check"))


def _needRedis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise SkipTest("redis-server and redis-cli are not installed")


def _model(operations: list[Operation], data: dict[int, int]) -> list[Any]:
    """What a correct store answers to ``operations`` run in order, starting from ``data``."""
    expected: list[Any] = []
    for operation in operations:
        if operation.command == PUT:
            stored = operation.key not in data
            if stored:
                data[operation.key] = operation.value
            expected.append(stored)
        elif operation.command == GET:
            expected.append(data.get(operation.key))
        else:
            expected.append(data.pop(operation.key, None) is not None)
    return expected


def _keysBySlot(prefix: str, wanted: int, start: int = 0) -> dict[int, list[int]]:
    """Keys from ``start`` on, grouped by slot, until some slot has ``wanted`` of them."""
    bySlot: dict[int, list[int]] = {}
    key = start
    while True:
        slotKeys = bySlot.setdefault(keySlot(f"{prefix}{key}".encode()), [])
        slotKeys.append(key)
        if len(slotKeys) >= wanted:
            return bySlot
        key += 1


def _captureWarnings(case: TestCase) -> list[str]:
    """The formats of the warnings and errors logged from now until the test ends."""
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level.name in ("warn", "error"):
            warnings.append(str(event.get("log_format")))

    observer: Any = observe
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return warnings


class SlotAndURLTests(SynchronousTestCase):
    """The parts that need no cluster: hash slots, URLs, the CLUSTER SLOTS reply."""

    def test_keySlot(self) -> None:
        # The reference value of the Redis Cluster specification, and its hash-tag rules.
        self.assertEqual(keySlot(b"123456789"), 0x31C3)
        self.assertEqual(keySlot(b"{user1000}.following"), keySlot(b"user1000"))
        self.assertEqual(keySlot(b"{user1000}.followers"), keySlot(b"{user1000}.following"))
        # An empty tag is no tag: the whole key counts.
        self.assertEqual(keySlot(b"foo{}{bar}"), crc_hqx(b"foo{}{bar}", 0) % 16384)
        self.assertEqual(keySlot(b"foo{{bar}}zap"), keySlot(b"{bar"))
        self.assertEqual(keySlot(b"foo{bar}{zap}"), keySlot(b"bar"))

    def test_url(self) -> None:
        options = EngineOptions()
        store = fromURL("redis-cluster://127.0.0.1:7000,localhost:7001,[::1]:7002,example.org", options, reactor)
        self.assertEqual(store.describe(), "redis-cluster://127.0.0.1:7000,localhost:7001,[::1]:7002,example.org:6379")
        self.assertIsInstance(store, IRemoteStore)
        self.assertIsInstance(openEngine("redis-cluster://h:1", options, reactor), RedisClusterStore)
        secret = fromURL("redis-cluster://app:s%40cret@h:1,h:2", options, reactor)
        self.assertEqual(secret.describe(), "redis-cluster://h:1,h:2")
        self.assertEqual((secret._username, secret._password), ("app", "s@cret"))

    def test_badURLs(self) -> None:
        for url, words in [
            ("redis-cluster://", "has no host"),
            ("redis-cluster://h:1,", "has no host"),
            ("redis-cluster://h:0", "port must be a number from 1 to 65535"),
            ("redis-cluster://h:http", "port must be a number"),
            ("redis-cluster://h:1/0", "has a path"),
            ("redis-cluster://::1:7000", "IPv6 address in brackets"),
            ("redis-cluster://[::1:7000", "is not HOST:PORT"),
            ("redis-cluster://secret@h:1", "password after a colon"),
        ]:
            with self.assertRaises(EngineURLError) as raised:
                fromURL(url, EngineOptions(), reactor)
            message = str(raised.exception)
            self.assertIn(words, message)
            self.assertNotIn("\n", message)
            self.assertNotIn("secret", message)

    def test_clusterSlotsReply(self) -> None:
        owners = parseClusterSlots(
            [[0, 99, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.2", 7003, b"id4"]], [200, 16383, [b"", 7001, b"id2"]]],
            "seed.example",
        )
        self.assertEqual(owners[0], "10.0.0.1:7000")
        self.assertEqual(owners[99], "10.0.0.1:7000")
        self.assertIsNone(owners[100])
        self.assertEqual(owners[16383], "seed.example:7001")
        for bad in [b"ERR", [[0, 16384, [b"h", 1]]], [[5, 1, [b"h", 1]]], [[0, 1]]]:
            self.assertRaises(ValueError, parseClusterSlots, bad, "seed")


class ClusterTests(TestCase):
    """One cluster for the class; each test opens its own store on it."""

    cluster: redisclusterprocs.RedisCluster

    @classmethod
    def setUpClass(cls) -> None:
        _needRedis()
        cls.cluster = redisclusterprocs.startCluster()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.stop()

    def openStore(self, prefix: str = "kvtwist:", timeout: float = 2.0) -> RedisClusterStore:
        store = fromURL(self.cluster.url, EngineOptions(keyPrefix=prefix, timeout=timeout), reactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def test_slotsAgreeWithRedis(self) -> None:
        """The slot of every kind of key, hash tags included, is the one Redis computes."""
        server = self.cluster.masters[0]
        for key in [b"123456789", b"kvtwist:-9223372036854775808", b"a{b}c", b"{}x", b"x{", b"{{a}}", b"p{q}{r}", b"\xff{}"]:
            self.assertEqual(keySlot(key), server.call("CLUSTER", "KEYSLOT", key), key)

    @inlineCallbacks
    def test_semanticsAcrossMasters(self) -> Any:
        """put/get/del mean what they mean with the single-node engine, for keys on all three masters."""
        store = self.openStore(prefix="sem:")
        owners = self.cluster.slotOwners()
        keys = [MIN, MAX, -1, 0] + list(range(1, 40))
        self.assertEqual({owners[keySlot(b"sem:%d" % key)] for key in keys}, set(self.cluster.masters))
        outcomes = yield store.execute([Operation(PUT, key, -key if key != MIN else MAX) for key in keys])
        self.assertEqual(outcomes, [True] * len(keys))
        outcomes = yield store.execute([Operation(PUT, key, 5) for key in keys])
        self.assertEqual(outcomes, [False] * len(keys))
        outcomes = yield store.execute([Operation(GET, key) for key in keys])
        self.assertEqual(outcomes, [-key if key != MIN else MAX for key in keys])
        # Stored as the single-node engine stores it: prefix, decimal key, canonical decimal value.
        for key in (MIN, 7):
            owner = owners[keySlot(b"sem:%d" % key)]
            assert owner is not None
            self.assertEqual(owner.call("GET", f"sem:{key}"), b"%d" % (MAX if key == MIN else -key))
        outcomes = yield store.execute([Operation(DELETE, key) for key in keys] + [Operation(DELETE, 0), Operation(GET, 0)])
        self.assertEqual(outcomes, [True] * len(keys) + [False, None])
        self.assertEqual(store.redirects, {"moved": 0, "ask": 0, "retried": 0})
        self.assertEqual(store.stats.operations, 4 * len(keys) + 2)
        self.assertEqual(store.stats.errors, {})

    @inlineCallbacks
    def test_hashTaggedPrefix(self) -> Any:
        """A prefix with a hash tag keeps every key in that tag's slot, on its master."""
        store = self.openStore(prefix="app{tag}:")
        outcomes = yield store.execute([Operation(PUT, key, key) for key in range(20)])
        self.assertEqual(outcomes, [True] * 20)
        owner = self.cluster.owner(keySlot(b"tag"))
        self.assertEqual(owner.call("CLUSTER", "COUNTKEYSINSLOT", keySlot(b"tag")), 20)
        self.assertEqual(store.redirects["moved"], 0)

    @inlineCallbacks
    def test_chunkOrder(self) -> Any:
        """
        Chunks that span the masters answer in request order, and operations
        on one key take effect in order: the outcomes are those of a dict.
        """
        store = self.openStore(prefix="order:")
        rng = random.Random(7)
        data: dict[int, int] = {}
        for _ in range(30):
            chunk = [Operation(rng.choice((PUT, GET, DELETE)), rng.randrange(24), rng.randrange(-5, 5)) for _ in range(48)]
            expected = _model(chunk, data)
            outcomes = yield store.execute(chunk)
            self.assertEqual(outcomes, expected)
        self.assertEqual(store.stats.errors, {})

    @inlineCallbacks
    def test_bothPathsAnswerAlike(self) -> Any:
        """The compiled RESP path (where it is built) and the Python one give the same outcomes, errors included."""
        compiledStore = self.openStore(prefix="cpath:")
        self.assertIs(compiledStore.compiled, respPath)
        self.patch(rediscluster, "respPath", None)
        pureStore = self.openStore(prefix="ppath:")
        self.assertIsNone(pureStore.compiled)
        for prefix in ("cpath", "ppath"):
            self.cluster.owner(keySlot(b"%s:5" % prefix.encode())).call("SET", f"{prefix}:5", "abc")
        rng = random.Random(11)
        data: dict[int, int] = {5: 0}
        for _ in range(20):
            chunk = [Operation(rng.choice((PUT, GET, DELETE)), rng.randrange(4, 24), rng.randrange(-5, 5)) for _ in range(32)]
            chunk = [operation for operation in chunk if operation.key != 5] + [Operation(GET, 5)]
            expected = _model(chunk, data)
            ours = yield compiledStore.execute(chunk)
            theirs = yield pureStore.execute(chunk)
            self.assertEqual([str(o) if isinstance(o, StoreError) else o for o in ours],
                             [str(o) if isinstance(o, StoreError) else o for o in theirs])
            self.assertEqual(ours[:-1], expected[:-1])
            self.assertIsInstance(ours[-1], StoreError)
        self.assertEqual(compiledStore.stats.errors, pureStore.stats.errors)
        self.assertEqual(compiledStore.stats.errors, {"bad value": 20})

    @inlineCallbacks
    def test_movedAfterStaleMap(self) -> Any:
        """A slot moved behind the store's back: MOVED sends each operation to the new master, and the map follows."""
        store = self.openStore(prefix="moved:")
        slot, keys = next((s, k) for s, k in _keysBySlot("moved:", 5).items() if len(k) >= 5)
        outcomes = yield store.execute([Operation(PUT, key, key * 3) for key in keys])
        self.assertEqual(outcomes, [True] * 5)
        source = self.cluster.owner(slot)
        target = next(master for master in self.cluster.masters if master is not source)
        self.assertEqual(store.ownerOf(slot), redisclusterprocs.addressOf(source))
        moved = yield deferToThread(redisclusterprocs.moveSlot, self.cluster, slot, target)
        self.assertEqual(moved, 5)
        outcomes = yield store.execute([Operation(GET, key) for key in keys] + [Operation(PUT, keys[0], 1)])
        self.assertEqual(outcomes, [key * 3 for key in keys] + [False])
        self.assertGreaterEqual(store.redirects["moved"], 1)
        self.assertEqual(store.ownerOf(slot), redisclusterprocs.addressOf(target))
        yield deferLater(reactor, 0.3, lambda: None)
        # The background refresh saw the same map: no more redirects.
        before = store.redirects["moved"]
        outcomes = yield store.execute([Operation(DELETE, key) for key in keys])
        self.assertEqual(outcomes, [True] * 5)
        self.assertEqual(store.redirects["moved"], before)

    @inlineCallbacks
    def test_redirectLoop(self) -> Any:
        """
        A slot MIGRATING to a master that does not import it sends ASK one
        way and MOVED back: the store gives up after a few redirects, fast.
        """
        store = self.openStore(prefix="loop:")
        slot = keySlot(b"loop:1")
        source = self.cluster.owner(slot)
        target = next(master for master in self.cluster.masters if master is not source)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", redisclusterprocs.nodeId(target))
        self.addCleanup(source.call, "CLUSTER", "SETSLOT", slot, "STABLE")
        started = reactor.seconds()
        outcomes = yield store.execute([Operation(PUT, 1, 1), Operation(GET, 1)])
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual([o.reason if isinstance(o, StoreUnavailable) else o for o in outcomes], ["too many redirects"] * 2)
        self.assertEqual(store.stats.errors, {"too many redirects": 2})
        self.assertGreaterEqual(store.redirects["ask"], 2 * 3)
        self.assertGreaterEqual(store.redirects["moved"], 2 * 2)

    @inlineCallbacks
    def test_reshardDuringLoad(self) -> Any:
        """
        A slot moves, keys and all, while clients keep writing new keys to
        it and reading those written: the store follows the ASK redirects of
        the half-moved slot and the MOVED ones after it, no request fails,
        and every acknowledged put is there afterwards with its value.
        """
        # The tag puts every key of this store in the slot that moves.
        store = self.openStore(prefix="load{reshard}:")
        slot = keySlot(b"reshard")
        source = self.cluster.owner(slot)
        target = next(master for master in self.cluster.masters if master is not source)
        acknowledged: dict[int, int] = {}
        failures: list[Any] = []
        mismatches: list[Any] = []
        state = {"next": 0, "moving": True}

        @inlineCallbacks
        def client(rng: random.Random) -> Any:
            while state["moving"]:
                puts = []
                for _ in range(12):
                    state["next"] += 1
                    puts.append(Operation(PUT, state["next"], rng.randrange(MIN, MAX)))
                known = rng.sample(sorted(acknowledged), min(4, len(acknowledged)))
                chunk = puts + [Operation(GET, key) for key in known]
                outcomes = yield store.execute(chunk)
                for operation, outcome in zip(chunk, outcomes):
                    if isinstance(outcome, Exception):
                        failures.append((operation, outcome))
                    elif operation.command == PUT:
                        if outcome is True:
                            acknowledged[operation.key] = operation.value
                        else:
                            mismatches.append((operation, outcome))
                    elif outcome != acknowledged[operation.key]:
                        mismatches.append((operation, outcome))
                # Paced, so that the migration's thread gets its turn.
                yield deferLater(reactor, 0.005, lambda: None)

        # Some keys in the slot before it starts to move.
        yield store.execute([Operation(PUT, key, key) for key in range(-200, 0)])
        acknowledged.update({key: key for key in range(-200, 0)})
        clients = gatherResults([client(random.Random(seed)) for seed in range(4)])
        yield deferLater(reactor, 0.1, lambda: None)
        migrated = yield deferToThread(redisclusterprocs.moveSlot, self.cluster, slot, target, 0.02, 20)
        # Keep the load on a little after the move, so that MOVED is met too.
        yield deferLater(reactor, 0.3, lambda: None)
        state["moving"] = False
        yield clients
        self.assertGreater(migrated, 200)
        self.assertEqual(failures, [])
        self.assertEqual(mismatches, [])
        self.assertGreater(store.redirects["ask"], 0)
        self.assertGreater(store.redirects["moved"], 0)
        self.assertEqual(store.ownerOf(slot), redisclusterprocs.addressOf(target))
        keys = sorted(acknowledged)
        self.assertGreater(len(keys), 1000)
        outcomes = yield store.execute([Operation(GET, key) for key in keys])
        self.assertEqual(dict(zip(keys, outcomes)), acknowledged)
        self.assertEqual(target.call("CLUSTER", "COUNTKEYSINSLOT", slot), len(keys))
        self.assertEqual(source.call("CLUSTER", "COUNTKEYSINSLOT", slot), 0)

    def test_twoServersShareTheCluster(self) -> None:
        """Two kvtwist servers on one cluster: a write on one is read on the other, and the checker passes both."""
        args = ("--store", self.cluster.url, "--key-prefix", "shared:", "--store-timeout", "2")
        first = start_server(*args)
        self.addCleanup(first.stop)
        second = start_server(*args)
        self.addCleanup(second.stop)
        with first.connect() as one, second.connect() as two:
            self.assertEqual(exchange(one, b"put 42 -7\nput 43 8\n", 2), b"OK\nOK\n")
            self.assertEqual(exchange(two, b"get 42\nput 43 9\ndel 43\nget 43\n", 4), b"-7\nKey already exists\nOK\nKey not found\n")
            self.assertEqual(exchange(one, b"get 43\n", 1), b"Key not found\n")
        check = subprocess.run(
            [CHECKER, f"{first.host}:{first.port}", f"{second.host}:{second.port}", "--duration", "2", "--clients", "16"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        first.stop()
        second.stop()
        for server in (first, second):
            self.assertIn("Redis Cluster slot map: 3 masters", server.log_text())
            self.assertNotIn("Traceback", server.log_text())


class FaultTests(TestCase):
    """A master that stops answering, dies, and comes back, on a cluster of its own."""

    cluster: redisclusterprocs.RedisCluster

    @classmethod
    def setUpClass(cls) -> None:
        _needRedis()
        # A short node timeout, so that the others soon call the cluster down.
        cls.cluster = redisclusterprocs.startCluster(extra=("--cluster-node-timeout", "1000"))

    @classmethod
    def tearDownClass(cls) -> None:
        for master in cls.cluster.masters:
            if redisclusterprocs.alive(master):
                master.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        cls.cluster.stop()

    @inlineCallbacks
    def test_deadMaster(self) -> Any:
        timeout = 1.0
        store = fromURL(self.cluster.url, EngineOptions(keyPrefix="fault:", timeout=timeout), reactor)
        store.startService()
        self.addCleanup(store.stopService)
        warnings = _captureWarnings(self)
        owners = self.cluster.slotOwners()
        victim = self.cluster.masters[0]
        keys = list(range(60))
        onVictim = [owners[keySlot(b"fault:%d" % key)] is victim for key in keys]
        self.assertTrue(any(onVictim) and not all(onVictim))
        outcomes = yield store.execute([Operation(PUT, key, key) for key in keys])
        self.assertEqual(outcomes, [True] * len(keys))

        def timed(operations: list[Operation]) -> Deferred[tuple[float, list[Any]]]:
            started = reactor.seconds()
            return store.execute(operations).addCallback(lambda outcomes: (reactor.seconds() - started, outcomes))

        # Stopped: written, never answered. Those operations time out, the others are answered.
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        elapsed, outcomes = yield timed([Operation(GET, key) for key in keys])
        self.assertLess(elapsed, timeout + 0.5)
        for key, outcome, lost in zip(keys, outcomes, onVictim):
            if lost:
                self.assertIsInstance(outcome, StoreUnavailable)
                self.assertIn(outcome.reason, (TIMED_OUT, OUTCOME_UNKNOWN))
            else:
                self.assertEqual(outcome, key)

        # Dead: its operations fail at once, and many chunks log the outage once.
        victim.kill()
        yield deferLater(reactor, 0.3, lambda: None)
        lostKeys = [key for key, lost in zip(keys, onVictim) if lost]
        for _ in range(5):
            elapsed, outcomes = yield timed([Operation(GET, key) for key in lostKeys])
            self.assertLess(elapsed, timeout / 2)
            for outcome in outcomes:
                self.assertIsInstance(outcome, StoreUnavailable)
                self.assertNotIn(outcome.reason, (TIMED_OUT, OUTCOME_UNKNOWN))
        self.assertEqual(len([text for text in warnings if "unavailable" in text]), 1, warnings)
        self.assertGreaterEqual(sum(store.stats.errors.values()), 6 * len(lostKeys))

        # The survivors call the cluster down: retried until the deadline, then refused, never hung.
        yield deferToThread(self.cluster.waitState, "fail", 20.0)
        survivors = [key for key, lost in zip(keys, onVictim) if not lost]
        elapsed, outcomes = yield timed([Operation(GET, key) for key in survivors])
        self.assertLess(elapsed, timeout + 0.5)
        self.assertEqual([o.reason if isinstance(o, StoreUnavailable) else o for o in outcomes], ["cluster down"] * len(survivors))
        # Retried with growing pauses (0.05, 0.1, 0.2, 0.4 s) while the deadline allowed.
        self.assertGreaterEqual(store.redirects["retried"], 3 * len(survivors))

        # The master comes back (empty: nothing was saved): the cluster is
        # whole again, and the same store serves every slot, with no restart of its own.
        yield deferToThread(victim.restart)
        yield deferToThread(self.cluster.waitState, "ok", 30.0)
        deadline = reactor.seconds() + 10.0
        while True:
            outcomes = yield store.execute([Operation(PUT, key, key + 1) for key in lostKeys])
            if all(outcome is True for outcome in outcomes) or reactor.seconds() > deadline:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(outcomes, [True] * len(lostKeys))
        outcomes = yield store.execute([Operation(GET, key) for key in keys])
        self.assertEqual(outcomes, [key + 1 if lost else key for key, lost in zip(keys, onVictim)])
        self.assertIsNone(store.stats.unavailable)


class NoClusterTests(TestCase):
    """Seeds where nothing listens: requests are refused within the timeout, and the outage is logged once."""

    @inlineCallbacks
    def test_noSeedAnswers(self) -> Any:
        ports = [redisclusterprocs.freePort() for _ in range(2)]
        url = "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
        store = fromURL(url, EngineOptions(timeout=1.0), reactor)
        warnings = _captureWarnings(self)
        store.startService()
        self.addCleanup(store.stopService)
        for _ in range(3):
            started = reactor.seconds()
            outcomes = yield store.execute([Operation(PUT, 1, 1), Operation(GET, 2)])
            self.assertLess(reactor.seconds() - started, 0.5)
            self.assertEqual([o.reason if isinstance(o, StoreUnavailable) else o for o in outcomes], ["no slot map"] * 2)
        self.assertEqual(len([text for text in warnings if "slot map" in text]), 1, warnings)
        self.assertEqual(store.stats.errors["no slot map"], 6)
        self.assertIsNone(store.ownerOf(0))

"""
The redis-cluster engine: kvtwist's data in a Redis Cluster.

Each key lives in one of the cluster's 16384 hash slots (CRC16 of the
key, or of its ``{hash tag}``), and each slot on one master. The store
keeps the slot map that ``CLUSTER SLOTS`` reports, one ``RedisNode`` per
master, and sends each chunk's operations to their masters, one pipelined
write per master. Operations on the same key share a slot, so a master
and a connection, and keep their order.

The map goes stale when slots move (resharding, failover). A master that
no longer serves a slot answers ``MOVED``: the store points the slot at
the new master, refreshes the whole map in the background and sends the
operation again. A slot half way through a move answers ``ASK`` for the
keys already gone: the operation goes to the importing master behind an
``ASKING``, and the map stays as it is. ``TRYAGAIN`` and ``CLUSTERDOWN``
are retried after a short pause. Every retry is bounded: a few redirects
per operation, and every outcome within the store's timeout.
"""

from __future__ import annotations

from binascii import crc_hqx
from types import ModuleType
from typing import Any, Iterable, Sequence
from urllib.parse import unquote

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from kvtwist.compiled import respPath
from kvtwist.engines import EngineOptions, EngineURLError
from kvtwist.engines.redis import CommandEncoder, outcomeOf
from kvtwist.engines.redisnode import RedisNode, ReplyError, asIs, encodeCommands
from kvtwist.storage.interface import TIMED_OUT, EngineStats, Operation, Outcome, StoreUnavailable

SLOTS = 16384
DEFAULT_PORT = 6379

# Redirects one operation may follow before it fails: a move takes one
# MOVED or an ASK then a MOVED; more means the map keeps changing under us.
MAX_REDIRECTS = 5
# Pause before retrying after TRYAGAIN or CLUSTERDOWN, doubling up to the
# ceiling: long enough for a migration step or a failover vote to progress,
# few retries for a cluster that stays down.
RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 0.4
# Least time between two fetches of the whole map, so that a burst of
# MOVED replies during a resharding costs one CLUSTER SLOTS, not hundreds.
REFRESH_INTERVAL = 0.2

# Error replies worth sending again after a pause; by their first word.
_RETRIABLE = {b"TRYAGAIN": "try again", b"CLUSTERDOWN": "cluster down", b"LOADING": "loading"}

_ASKING = encodeCommands([[b"ASKING"]])
_CLUSTER_SLOTS = (b"CLUSTER", b"SLOTS")

# An operation sent whose answer has not come yet.
_UNANSWERED: Any = object()

_log = Logger()


def keySlot(key: bytes) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) of its hash tag, or of all of it, mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) & (SLOTS - 1)


def parseAddress(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` (a bare ``HOST`` means port 6379); ValueError with the reason."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not HOST:PORT")
        portText = rest[1:]
    else:
        host, colon, portText = text.rpartition(":")
        if not colon:
            host, portText = text, ""
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not portText:
        return host, DEFAULT_PORT
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(portText)


def parseClusterSlots(reply: object, askedHost: str) -> list[str | None]:
    """
    The master address ("host:port") of every slot, from a ``CLUSTER SLOTS`` reply.

    A master reported without a host (an empty or ``?`` endpoint) is on
    the host that was asked. Slots no master serves are None. Raises
    ValueError for a reply of another shape.
    """
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {reply!r}")
    owners: list[str | None] = [None] * SLOTS
    for entry in reply:
        try:
            start, end, master = entry[0], entry[1], entry[2]
            hostBytes, port = master[0], int(master[1])
        except (TypeError, IndexError, ValueError):
            raise ValueError(f"CLUSTER SLOTS answered an entry {entry!r}") from None
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start <= end < SLOTS:
            raise ValueError(f"CLUSTER SLOTS answered a range {start!r}-{end!r}")
        host = hostBytes.decode() if isinstance(hostBytes, bytes) else str(hostBytes)
        if host in ("", "?"):
            host = askedHost
        owners[start : end + 1] = [_formatAddress(host, port)] * (end - start + 1)
    return owners


def _formatAddress(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redirectAddress(text: str) -> str:
    """The address a MOVED or ASK names, which writes an IPv6 host without brackets."""
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        return f"{host}:{int(port)}"
    return _formatAddress(host, int(port))


def fromURL(url: str, options: EngineOptions, reactor: Any) -> RedisClusterStore:
    """The store a ``redis-cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]`` URL names."""
    scheme, _, rest = url.partition("://")
    if scheme != "redis-cluster":
        raise EngineURLError(f"{url!r}: expected redis-cluster://HOST:PORT[,HOST:PORT...]")
    userInfo, at, hostList = rest.rpartition("@")
    if not at:
        userInfo = ""
    if any(mark in hostList for mark in "/?#"):
        raise EngineURLError(
            f"redis-cluster URL {_withoutPassword(url)!r} has a path; a Redis Cluster has one database, "
            "so write only redis-cluster://HOST:PORT[,HOST:PORT...]"
        )
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userInfo.partition(":")
        if not colon or not secret:
            raise EngineURLError(
                f"redis-cluster URL {_withoutPassword(url)!r}: write the password after a colon, "
                "redis-cluster://[USER]:PASSWORD@HOST:PORT[,HOST:PORT...]"
            )
        username, password = (unquote(user) or None), unquote(secret)
    seeds: list[tuple[str, int]] = []
    for part in hostList.split(","):
        try:
            seeds.append(parseAddress(part.strip()))
        except ValueError as error:
            raise EngineURLError(f"redis-cluster URL {_withoutPassword(url)!r}: {error}") from None
    return RedisClusterStore(seeds, options, reactor, username=username, password=password, compiled=respPath)


def _withoutPassword(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class _Chunk:
    """
    One ``execute``: its operations on their way through the cluster.

    Each send to a master is answered within the node's timeout, so a
    chunk that needs no retry needs no timer of its own. The first retry
    arms one at the chunk's deadline: whatever is still unanswered then
    gets its ``StoreUnavailable`` and late answers are ignored.
    """

    __slots__ = (
        "store", "operations", "commands", "slots", "outcomes", "result",
        "deadline", "timer", "waiting", "redirects", "retries", "asking", "done",
    )  # fmt: skip

    def __init__(self, store: RedisClusterStore, operations: Sequence[Operation]) -> None:
        self.store = store
        self.operations = operations
        # Each operation's command, encoded.
        self.commands: list[bytes] = []
        self.slots: list[int] = []
        self.outcomes: list[Outcome] = [_UNANSWERED] * len(operations)
        self.result: Deferred[list[Outcome]] = Deferred()
        self.deadline = store._reactor.seconds() + store._options.timeout
        self.timer: Any = None
        # Sends and pauses outstanding; the chunk is answered when none is left.
        self.waiting = 0
        # Redirects followed and refusals retried, by operation; the master each ASK named.
        self.redirects: dict[int, int] = {}
        self.retries: dict[int, int] = {}
        self.asking: dict[int, RedisNode] = {}
        self.done = False

    def send(self, indices: Iterable[int]) -> None:
        """Send these operations (in this order), one pipelined write per master."""
        if self.done:
            return
        store = self.store
        slotNodes = store._slotNodes
        commands = self.commands
        groups: dict[RedisNode, tuple[list[int], list[bytes]]] = {}
        unserved = False
        for index in indices:
            node = self.asking.pop(index, None) if self.asking else None
            asked = node is not None
            if node is None:
                node = slotNodes[self.slots[index]]
                if node is None:
                    self.outcomes[index] = StoreUnavailable("slot not served")
                    unserved = True
                    continue
            group = groups.get(node)
            if group is None:
                group = groups[node] = ([], [])
            if asked:
                # -1: the ASKING reply, skipped when the answers come.
                group[0].append(-1)
                group[1].append(_ASKING)
            group[0].append(index)
            group[1].append(commands[index])
            self.outcomes[index] = _UNANSWERED
        if unserved:
            store._refreshSoon()
        for node, (groupIndices, groupCommands) in groups.items():
            self.waiting += 1
            node.sendEncoded(b"".join(groupCommands), len(groupCommands), asIs).addCallback(self._answered, groupIndices)
        if not self.waiting:
            self._finish()

    def _answered(self, replies: list[object], indices: list[int]) -> None:
        self.waiting -= 1
        if self.done:
            return
        outcomes = self.outcomes
        operations = self.operations
        compiled = self.store.compiled
        if compiled is not None and -1 not in indices:
            # The common case, no redirect and no error among the replies, in C.
            decoded = compiled.decodeOutcomes([operations[index] for index in indices], replies)
            if decoded is not None:
                for index, outcome in zip(indices, decoded):
                    outcomes[index] = outcome
                if not self.waiting:
                    self._finish()
                return
        stats = self.store.stats
        again: list[int] = []
        pause = 0.0
        for index, reply in zip(indices, replies):
            if index < 0:
                continue
            if isinstance(reply, ReplyError):
                delay = self._redirect(index, reply)
                if delay is None:
                    continue
                again.append(index)
                pause = max(pause, delay)
            else:
                outcomes[index] = outcomeOf(operations[index], reply, stats)
        if again:
            self._retry(again, pause)
        elif not self.waiting:
            self._finish()

    def _redirect(self, index: int, error: ReplyError) -> float | None:
        """
        Note what an error reply asks for: None if the operation is over
        (its outcome set), else the pause before it is sent again.
        """
        text = str(error).encode()
        word, _, rest = text.partition(b" ")
        store = self.store
        if word == b"MOVED" or word == b"ASK":
            redirects = self.redirects.get(index, 0) + 1
            self.redirects[index] = redirects
            if redirects > MAX_REDIRECTS:
                self.outcomes[index] = StoreUnavailable("too many redirects")
                return None
            try:
                slotText, address = rest.decode().split(" ")
                slot = int(slotText)
                node = store._node(_redirectAddress(address))
            except ValueError:
                self.outcomes[index] = outcomeOf(self.operations[index], error, store.stats)
                return None
            if word == b"MOVED":
                store.redirects["moved"] += 1
                store._moved(slot, node)
            else:
                store.redirects["ask"] += 1
                self.asking[index] = node
            self.outcomes[index] = StoreUnavailable("redirected")
            return 0.0
        reason = _RETRIABLE.get(word)
        if reason is None:
            self.outcomes[index] = outcomeOf(self.operations[index], error, store.stats)
            return None
        store.redirects["retried"] += 1
        retries = self.retries.get(index, 0)
        self.retries[index] = retries + 1
        # Refused, so not done: if it is not sent again, say why.
        self.outcomes[index] = StoreUnavailable(reason)
        return min(MAX_RETRY_DELAY, RETRY_DELAY * 2**retries)

    def _retry(self, indices: list[int], pause: float) -> None:
        store = self.store
        reactor = store._reactor
        left = self.deadline - reactor.seconds()
        if not pause:
            if self.timer is None:
                self.timer = reactor.callLater(max(0.0, left), self._expire)
            self.send(indices)
            return
        if pause >= left:
            # The answer would come too late: give up now, with the refusal's reason.
            if not self.waiting:
                self._finish()
            return
        if self.timer is None:
            self.timer = reactor.callLater(left, self._expire)
        self.waiting += 1
        reactor.callLater(pause, self._resume, indices)

    def _resume(self, indices: list[int]) -> None:
        self.waiting -= 1
        self.send(indices)

    def _expire(self) -> None:
        """The deadline: what is still unanswered timed out."""
        self.timer = None
        if self.done:
            return
        outcomes = self.outcomes
        timedOut = 0
        for index, outcome in enumerate(outcomes):
            if outcome is _UNANSWERED:
                outcomes[index] = StoreUnavailable(TIMED_OUT)
                timedOut += 1
        if timedOut:
            self.store.stats.failed(TIMED_OUT, timedOut)
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        store = self.store
        for outcome in self.outcomes:
            if isinstance(outcome, StoreUnavailable) and outcome.reason in _CLUSTER_REASONS:
                store.stats.failed(outcome.reason)
        self.result.callback(self.outcomes)


# Failures this layer decides (the nodes count theirs).
_CLUSTER_REASONS = {"slot not served", "too many redirects", "redirected", "no slot map", *_RETRIABLE.values()}


class RedisClusterStore(Service):
    """
    An ``IRemoteStore`` on a Redis Cluster, reached through ``seeds``.

    Starting the service fetches the slot map from the first seed that
    answers; stopping it closes every master's connections.
    """

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        options: EngineOptions,
        reactor: Any,
        *,
        username: str | None = None,
        password: str | None = None,
        compiled: ModuleType | None,
    ) -> None:
        """``compiled`` is ``kvtwist.compiled.respPath``, or None for the Python path alone."""
        if not seeds:
            raise EngineURLError("a redis-cluster store needs at least one HOST:PORT")
        self.stats = EngineStats()
        # Redirects and retries followed, by kind: for the logs and the tests.
        self.redirects = {"moved": 0, "ask": 0, "retried": 0}
        self._seeds = [_formatAddress(host, port) for host, port in seeds]
        self._options = options
        self._reactor = reactor
        self._username = username
        self._password = password
        prefix = options.keyPrefix.encode()
        self._prefix = prefix
        self._encoder = CommandEncoder(prefix)
        # The compiled RESP path (kvtwist.compiled.respPath), or None for the Python one.
        self.compiled = compiled
        # Keys are the prefix and a decimal number, which has no braces: so
        # the prefix alone decides whether a hash tag applies (one slot for
        # every key), and otherwise the CRC of the prefix is computed once.
        tagStart = prefix.find(b"{")
        hasTag = tagStart >= 0 and prefix.find(b"}", tagStart + 1) > tagStart + 1
        self._fixedSlot = keySlot(prefix) if hasTag else -1
        self._prefixCrc = crc_hqx(prefix, 0)
        self._nodes: dict[str, RedisNode] = {}
        self._slotNodes: list[RedisNode | None] = [None] * SLOTS
        self._mapped = False
        # While the map is being fetched: who waits for it.
        self._refreshing: list[Deferred[bool]] | None = None
        self._refreshCall: Any = None
        self._lastRefresh = float("-inf")
        # Why the last fetch of the map failed; logged once per outage.
        self._mapFailure: str | None = None

    def describe(self) -> str:
        return "redis-cluster://" + ",".join(self._seeds)

    def ownerOf(self, slot: int) -> str | None:
        """The address ("host:port") of the master this store sends ``slot`` to now; None before the map."""
        node = self._slotNodes[slot]
        return None if node is None else node.address

    def startService(self) -> None:
        super().startService()
        for address in self._seeds:
            self._node(address)
        for node in list(self._nodes.values()):
            if not node.running:
                node.startService()
        self._refresh()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._refreshCall is not None and self._refreshCall.active():
            self._refreshCall.cancel()
        self._refreshCall = None
        nodes, self._nodes = list(self._nodes.values()), {}
        self._slotNodes = [None] * SLOTS
        self._mapped = False
        return gatherResults([node.stopService() for node in nodes if node.running]).addCallback(lambda _: None)

    def execute(self, operations: Sequence[Operation]) -> Deferred[list[Outcome]]:
        """Run ``operations`` on their masters; see ``IRemoteStore`` for the promise."""
        chunk = _Chunk(self, operations)
        compiled = self.compiled
        if compiled is not None:
            chunk.commands = compiled.encodeEach(operations, self._prefix)
        else:
            chunk.commands = self._encoder.encode(operations)
        fixedSlot = self._fixedSlot
        prefixCrc = self._prefixCrc
        if fixedSlot >= 0:
            chunk.slots = [fixedSlot] * len(operations)
        else:
            chunk.slots = [crc_hqx(b"%d" % operation.key, prefixCrc) & (SLOTS - 1) for operation in operations]
        if not operations:
            return succeed([])
        self.stats.operations += len(operations)
        if self._mapped:
            chunk.send(range(len(operations)))
        elif not self.running:
            chunk.outcomes = [StoreUnavailable("not started")] * len(operations)
            chunk._finish()
        else:
            # Never sent, unless the map comes in time.
            chunk.outcomes = [StoreUnavailable("no slot map")] * len(operations)
            chunk.timer = self._reactor.callLater(self._options.timeout, chunk._expire)
            self._refresh().addCallback(self._mapArrived, chunk)
        return chunk.result

    def _mapArrived(self, mapped: bool, chunk: _Chunk) -> None:
        if chunk.done:
            return
        if mapped:
            chunk.send(range(len(chunk.operations)))
            return
        chunk.outcomes = [StoreUnavailable("no slot map")] * len(chunk.operations)
        chunk._finish()

    def _node(self, address: str) -> RedisNode:
        """The node for ``address`` ("host:port"), made (and started) on first use; ValueError for a bad one."""
        node = self._nodes.get(address)
        if node is None:
            host, port = parseAddress(address)
            node = RedisNode(
                host, port, self._options, self._reactor, self.stats,
                username=self._username, password=self._password,
            )  # fmt: skip
            self._nodes[address] = node
            if self.running:
                node.startService()
        return node

    def _moved(self, slot: int, node: RedisNode) -> None:
        """A master said ``slot`` is now on ``node``: believe it at once, and check the whole map soon."""
        if 0 <= slot < SLOTS:
            self._slotNodes[slot] = node
        self._refreshSoon()

    def _refreshSoon(self) -> None:
        if self._refreshing is not None or self._refreshCall is not None or not self.running:
            return
        wait = self._lastRefresh + REFRESH_INTERVAL - self._reactor.seconds()
        if wait <= 0:
            self._refresh()
        else:
            self._refreshCall = self._reactor.callLater(wait, self._refreshLater)

    def _refreshLater(self) -> None:
        self._refreshCall = None
        self._refresh()

    def _refresh(self) -> Deferred[bool]:
        """
        Fetch the slot map: from the masters known, then the seeds, the
        first that answers. Fires with whether the store has a map.
        """
        waiter: Deferred[bool] = Deferred()
        waiters = self._refreshing
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._refreshing = [waiter]
        self._lastRefresh = self._reactor.seconds()
        mapped = set(self._slotNodes)
        candidates = [address for address, node in self._nodes.items() if node in mapped]
        candidates += [address for address in self._seeds if address not in candidates]
        self._ask(candidates, [])
        return waiter

    def _ask(self, candidates: list[str], failures: list[str]) -> None:
        if not candidates or not self.running:
            self._refreshed(None, failures)
            return
        address = candidates.pop(0)
        node = self._node(address)

        def answered(replies: list[object]) -> None:
            reply = replies[0]
            try:
                if isinstance(reply, Exception):
                    raise ValueError(str(reply))
                owners = parseClusterSlots(reply, parseAddress(address)[0])
            except ValueError as error:
                failures.append(f"{address}: {error}")
                self._ask(candidates, failures)
                return
            self._refreshed(owners, failures)

        node.send([_CLUSTER_SLOTS]).addCallback(answered)

    def _refreshed(self, owners: list[str | None] | None, failures: list[str]) -> None:
        waiters, self._refreshing = self._refreshing or [], None
        if owners is None:
            reason = "; ".join(failures) or "the store stopped"
            if self._mapFailure is None and self.running:
                _log.warn(
                    "kvstore: cannot fetch the Redis Cluster slot map ({reason}); "
                    "requests get store unavailable until a node answers CLUSTER SLOTS",
                    reason=reason,
                )
            self._mapFailure = reason
            if not self._mapped:
                self.stats.unavailable = "no slot map"
        elif self.running:
            self._apply(owners)
        for waiter in waiters:
            waiter.callback(self._mapped)

    def _apply(self, owners: list[str | None]) -> None:
        mappedBefore = set(self._slotNodes)
        before = {address for address, node in self._nodes.items() if node in mappedBefore}
        self._slotNodes = [None if address is None else self._node(address) for address in owners]
        masters = {address for address in owners if address is not None}
        if self._mapFailure is not None or not self._mapped or masters != before:
            unserved = owners.count(None)
            _log.info(
                "kvstore: Redis Cluster slot map: {masters} masters ({addresses}){unserved}",
                masters=len(masters),
                addresses=", ".join(sorted(masters)),
                unserved=f", {unserved} slots unserved" if unserved else "",
            )
        self._mapFailure = None
        if not self._mapped or self.stats.unavailable == "no slot map":
            self.stats.unavailable = None
        self._mapped = True
        # A master that left the map (failed over, removed) is closed;
        # the seeds stay, to find the cluster again.
        for address in list(self._nodes):
            if address not in masters and address not in self._seeds:
                self._nodes.pop(address).stopService()

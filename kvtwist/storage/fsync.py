"""The ``--fsync`` policies: when journal records reach the disk, and which replies wait for them.

- ``always``: group commit.  A reply batch that depends on an unsynced
  record (its own write, or one whose value it read) waits for it, behind
  its connection's earlier batches; the first such batch of a reactor turn
  schedules one fsync, in a thread, at the end of the turn for every
  connection's writes; writes made while it runs wait for the next one.
- ``everysec``: a timer fsyncs once a second, in a thread (nothing waits
  for it, so the reactor need not); replies leave at once.
- ``no``: the operating system decides; replies leave at once.

Whatever the policy, a failed fsync turns the store read-only, and from
then on no fsync of that journal counts (``JournalWriter.sync``): the
replies still waiting for one are never sent.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kvtwist.histogram import Histogram
from kvtwist.storage.interface import Batch, IReplyTarget
from kvtwist.storage.journaled import JournaledStore

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_FSYNC = "everysec"

RunBlocking = Callable[[Callable[[], object]], "defer.Deferred[Any]"]
# Seconds, for the fsync duration histogram (--metrics).
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FsyncPolicy:
    """What the policies share: fsyncs in the background, one at a time; replies leave at once."""

    # Whether replies that depend on a write wait for an fsync: then its
    # record need reach the file only before that fsync, not before the reply.
    holdsReplies = False

    def __init__(self, store: JournaledStore, reactor: IReactorTime, runBlocking: RunBlocking) -> None:
        self.store = store
        self.reactor = reactor
        self._runBlocking = runBlocking
        self._inflight: defer.Deferred[Any] | None = None
        self._idleWaiters: list[defer.Deferred[None]] = []
        self.failed = False
        self.fsyncDurations = Histogram(FSYNC_BUCKETS)

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        target.sendReplies(batch)

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        """Stop syncing on our own; fires once no fsync is under way."""
        return self.whenIdle()

    def whenIdle(self) -> defer.Deferred[None]:
        """Fire when no background fsync is under way."""
        if self._inflight is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    def _syncInBackground(self) -> None:
        """Start fsyncing, off the reactor, everything appended so far."""
        # The count and the writer are taken together: every record up to
        # the count is in this writer's file or in one synced before it.
        target, writer, started = self.store.appended, self.store.writer, time.perf_counter()
        try:
            # Records still pending (the compiled path's) go to the file first, from the reactor thread.
            self.store.writePending()
        except Exception:
            self._syncEnded(Failure(), target, started)
            return
        self._inflight = self._runBlocking(writer.sync)
        self._inflight.addBoth(self._syncEnded, target, started)

    def _syncNow(self) -> None:
        """Fsync everything appended so far, in the reactor thread, and act on the result."""
        target, started = self.store.appended, time.perf_counter()
        result: object
        try:
            self.store.writePending()
            self.store.writer.sync()
            result = None
        except Exception:
            result = Failure()
        self._syncEnded(result, target, started)

    def _syncEnded(self, result: object, target: int, started: float) -> None:
        self._inflight = None
        self.fsyncDurations.observe(time.perf_counter() - started)
        failed = isinstance(result, Failure)
        if isinstance(result, Failure):
            self.failed = True
            self.store.turnReadOnly(str(result.value))
        else:
            self.store.markDurable(target)
        # Those who waited for the fsync to end (to stop) go first, before
        # the next fsync can start.
        waiters, self._idleWaiters = self._idleWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        if failed:
            self._syncFailed()
        else:
            self._synced()

    def _synced(self) -> None:
        pass

    def _syncFailed(self) -> None:
        pass


class NoSync(FsyncPolicy):
    """``--fsync no``: the operating system decides."""


class EverySecond(FsyncPolicy):
    """``--fsync everysec``: fsync once a second, when anything was appended."""

    interval = 1.0
    _timer: task.LoopingCall | None = None

    def start(self) -> None:
        self._timer = task.LoopingCall(self._tick)
        self._timer.clock = self.reactor
        self._timer.start(self.interval, now=False)

    def _tick(self) -> None:
        # Also when read-only after a failed append: what was written before
        # it still deserves the disk.  Not after a failed fsync: no later
        # one would count.
        if self._inflight is None and not self.failed and self.store.unsynced:
            self._syncInBackground()

    def stop(self) -> defer.Deferred[None]:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        return self.whenIdle()


class Always(FsyncPolicy):
    """``--fsync always``: group commit, one fsync at a time, in a thread.

    Each batch says, in ``waitFor``, the newest record its replies depend
    on, and leaves once an fsync has covered that record.  Batches that
    depend on nothing unsynced leave at once.  The batches of one
    connection always leave in the order they were delivered.

    The first batch of a reactor turn that must wait schedules one fsync
    for the end of the turn (``callLater(0)``: after every connection's
    reads of the turn, before the next poll), which covers every write of
    the turn, as Redis's ``beforeSleep`` does.  Unlike Redis's, it runs in
    a thread: the reactor goes on serving meanwhile (reads of durable keys
    leave at once), and the writes made during it form the group of the
    next fsync, which starts as soon as it ends.  That serves about a fifth
    more than an fsync in the reactor, for a higher p99: docs/durability.md
    has the measurements behind this.
    """

    holdsReplies = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._waiting: deque[tuple[int, IReplyTarget, Batch]] = deque()
        # The record each connection's last waiting batch waits for.
        self._lastWaiting: dict[IReplyTarget, int] = {}
        self._scheduled: IDelayedCall | None = None

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        needs = batch.waitFor
        before = self._lastWaiting.get(target)
        if before is None and needs <= self.store.durable:
            target.sendReplies(batch)
            return
        if self.failed:
            # No fsync will ever cover it: an answer now could be a lie.
            target.abandonReplies()
            return
        if before is not None and before > needs:
            needs = before
        self._waiting.append((needs, target, batch))
        self._lastWaiting[target] = needs
        if self._inflight is None and self._scheduled is None:
            self._scheduled = self.reactor.callLater(0, self._commit)

    def _commit(self) -> None:
        """Fsync what was written (see the class docstring for where), or send what a compaction's fsync covered."""
        self._scheduled = None
        if self._inflight is not None or self.failed:
            return
        if not self.store.unsynced:
            self._release()
        else:
            self._syncInBackground()

    def _release(self) -> None:
        """Send the batches whose records are durable now, in order."""
        durable = self.store.durable
        if durable >= self.store.appended:
            ready = [(target, batch) for _, target, batch in self._waiting]
            self._waiting = deque()
            self._lastWaiting = {}
        else:
            ready = [(target, batch) for needs, target, batch in self._waiting if needs <= durable]
            if not ready:
                return
            self._waiting = deque(item for item in self._waiting if item[0] > durable)
            self._lastWaiting = {target: needs for needs, target, _ in self._waiting}
        for target, batch in ready:
            target.sendReplies(batch)

    def _synced(self) -> None:
        self._release()
        # Writes made during an fsync in a thread have replies waiting: go on.
        if self._waiting:
            self._commit()

    def _syncFailed(self) -> None:
        # These replies may acknowledge writes that are not on disk: they
        # must not be sent.  Their clients see the connection close
        # instead, as after a crash.
        waiting, self._waiting = self._waiting, deque()
        self._lastWaiting = {}
        for _, target, _ in waiting:
            target.abandonReplies()

    def stop(self) -> defer.Deferred[None]:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        return self.whenIdle().addCallback(lambda _: self._flush())

    def _flush(self) -> None:
        """The last fsync, in the reactor, and the replies that waited for it."""
        if self.failed:
            return
        if self.store.unsynced:
            self._syncNow()
        else:
            self._release()


POLICIES: dict[str, type[FsyncPolicy]] = {"always": Always, "everysec": EverySecond, "no": NoSync}

"""When journaled changes reach the disk, and the service that runs it all.

``kvtwist.storage.journaled`` decides what goes in the log; this module decides
when it is made durable (the ``--fsync`` policy), when replies may leave
(``whenDurable``), when to compact, and how to stop cleanly.

- ``always``: group commit.  The first append of a reactor turn schedules
  one fsync (in a thread) for all the connections' writes; a reply batch
  that depends on an unsynced write (its own, or one whose value it read)
  waits for it, behind its connection's earlier batches.
- ``everysec``: a timer fsyncs once a second; replies leave at once.
- ``no``: the operating system decides; replies leave at once.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterator

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorCore, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvtwist.storage.compaction import Blocking, Crashpoint, noCrash
from kvtwist.storage.journaled import JournaledStore

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_FSYNC = "everysec"

READ_ONLY_HELP = (
    "Puts and dels are refused until the server is restarted; gets go on. "
    "Fix the cause (free disk space, replace the failing disk), then restart the server: "
    "recovery replays the journal and drops a torn last record, if any."
)

_log = Logger()


class _Policy:
    """What the fsync policies share: fsyncs in the background, one at a time."""

    def __init__(
        self, journaled: JournaledStore, reactor: Any, runBlocking: Callable[[Callable[[], object]], defer.Deferred[Any]]
    ) -> None:
        self.journaled = journaled
        self.reactor = reactor
        self._runBlocking = runBlocking
        self._inflight: defer.Deferred[Any] | None = None
        self._idleWaiters: list[defer.Deferred[None]] = []

    def appended(self) -> None:
        pass

    def whenDurable(self, f: Callable[..., object], *args: object) -> None:
        f(*args)

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        """Stop syncing on our own; fires once no fsync is under way."""
        return self.whenIdle()

    def whenIdle(self) -> defer.Deferred[None]:
        """Fire when no background fsync is under way (so that the last one can run in line)."""
        if self._inflight is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    def _syncInBackground(self) -> None:
        """Start fsyncing, off the reactor, everything appended so far."""
        target, sync = self.journaled.pendingSync()
        self._inflight = self._runBlocking(sync)
        self._inflight.addBoth(self._syncEnded, target)

    def _syncEnded(self, result: object, target: int) -> None:
        self._inflight = None
        failed = isinstance(result, Failure)
        if failed:
            error = result.value
            self.journaled.syncFailed(error if isinstance(error, OSError) else OSError(str(error)))
        else:
            self.journaled.markDurable(target)
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


class NoSync(_Policy):
    """``--fsync no``: the operating system decides."""


class EverySecond(_Policy):
    """``--fsync everysec``: fsync once a second, when anything was appended."""

    interval = 1.0

    def start(self) -> None:
        self._timer = task.LoopingCall(self._tick)
        self._timer.clock = self.reactor
        self._timer.start(self.interval, now=False)

    def _tick(self) -> None:
        journaled = self.journaled
        # Also when read-only after a failed append: what was written before
        # it still deserves the disk.  Not after a failed fsync.
        if self._inflight is None and not journaled.syncBroken and journaled.unsynced:
            self._syncInBackground()

    def stop(self) -> defer.Deferred[None]:
        timer = getattr(self, "_timer", None)
        if timer is not None and timer.running:
            timer.stop()
        return self.whenIdle()


class Always(_Policy):
    """``--fsync always``: group commit.

    Each reply batch is tagged with the newest record it depends on (a
    write it made, or a value it read that an unsynced write set; see
    ``JournaledStore.trackDependencies``) and leaves once an fsync has
    covered that record.  Batches that depend on nothing unsynced leave at
    once.  The batches of one connection always leave in the order they
    were produced; a connection is known by the object whose bound method
    the batch calls (the protocol).  While one fsync runs (in a thread),
    the reactor goes on serving; the next fsync covers all that was
    written meanwhile.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._waiting: deque[tuple[int, int, Callable[..., object], tuple[object, ...]]] = deque()
        # The tag of each connection's last waiting batch.
        self._lastWaiting: dict[int, int] = {}
        self._scheduled: Any = None
        self._failed = False
        self.journaled.trackDependencies()

    def appended(self) -> None:
        # Wait for the end of this reactor turn, so that one fsync covers
        # every connection's writes of the turn.
        if self._inflight is None and self._scheduled is None:
            self._scheduled = self.reactor.callLater(0, self._commit)

    def whenDurable(self, f: Callable[..., object], *args: object) -> None:
        journaled = self.journaled
        needs = journaled.takeDependency()
        # id(), not the object: protocols need not be hashable.  A waiting
        # batch holds its owner alive, so the id cannot be reused meanwhile.
        owner = id(getattr(f, "__self__", None))
        before = self._lastWaiting.get(owner)
        if self._failed or (before is None and needs <= journaled.durable):
            f(*args)
            return
        if before is not None and before > needs:
            needs = before
        self._waiting.append((needs, owner, f, args))
        self._lastWaiting[owner] = needs

    def _commit(self) -> None:
        """Start the next fsync, or, if another fsync (a compaction's) did the work, send."""
        self._scheduled = None
        if self._inflight is not None or self._failed:
            return
        if self.journaled.unsynced:
            self._syncInBackground()
        else:
            self._release()

    def _release(self) -> None:
        """Send the batches whose writes are durable now, in order."""
        durable = self.journaled.durable
        ready = [(f, args) for needs, _, f, args in self._waiting if needs <= durable]
        if ready:
            self._waiting = deque(item for item in self._waiting if item[0] > durable)
            self._lastWaiting = {owner: needs for needs, owner, _, _ in self._waiting}
            for f, args in ready:
                f(*args)

    def _synced(self) -> None:
        self._release()
        # What was appended during that fsync has replies waiting: go on.
        self._commit()

    def _syncFailed(self) -> None:
        # These replies may acknowledge writes that are not on disk: they
        # must not be sent.  Their clients see the connection close
        # instead, as after a crash.
        self._failed = True
        waiting, self._waiting = self._waiting, deque()
        self._lastWaiting = {}
        for _, _, f, _ in waiting:
            _abortConnectionOf(f)

    def stop(self) -> defer.Deferred[None]:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        return self.whenIdle().addCallback(lambda _: self._flush())

    def _flush(self) -> None:
        """Sync in the reactor (the last one) and send what is still waiting."""
        if not self._failed and self.journaled.unsynced:
            target, sync = self.journaled.pendingSync()
            self._inflight = defer.maybeDeferred(sync)
            self._inflight.addBoth(self._syncEnded, target)
        elif not self._failed:
            self._release()


def _abortConnectionOf(f: Callable[..., object]) -> None:
    """Close the connection that the reply callable ``f`` would have written to."""
    owner = getattr(f, "__self__", None)
    transport = owner if ITransport.providedBy(owner) else getattr(owner, "transport", None)
    if transport is not None:
        transport.abortConnection()


POLICIES: dict[str, type[_Policy]] = {"always": Always, "everysec": EverySecond, "no": NoSync}


class DurableService(service.Service):
    """Runs a ``JournaledStore``: its fsync policy, compactions and clean stop.

    ``whenDurable`` is the gate the protocol's factory sends every reply
    batch through.  ``runBlocking`` runs disk waits off the reactor (a
    thread by default); ``crashpoint`` lets tests stop a compaction at a
    named step.
    """

    def __init__(
        self,
        journaled: JournaledStore,
        fsync: str = DEFAULT_FSYNC,
        reactor: IReactorCore | None = None,
        runBlocking: Callable[[Callable[[], object]], defer.Deferred[Any]] | None = None,
        crashpoint: Crashpoint = noCrash,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[assignment]
        self.journaled = journaled
        self.fsync = fsync
        self.reactor = reactor
        self._runBlocking = runBlocking or self._inThread
        self.policy = POLICIES[fsync](journaled, reactor, self._runBlocking)
        self.whenDurable = self.policy.whenDurable
        self._crashpoint = crashpoint
        self._compaction: defer.Deferred[None] | None = None
        self._stopping = False
        self.longestCompactionStep = 0.0
        journaled.onAppend = self._appended
        journaled.onReadOnly = self._readOnly

    def _inThread(self, fn: Callable[[], object]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn)

    def _appended(self) -> None:
        self.policy.appended()
        if self._compaction is None and self.running and self.journaled.wantsCompaction():
            self.compact()

    def _readOnly(self, reason: str) -> None:
        _log.critical(
            "kvstore: THE STORE IS NOW READ-ONLY: {reason}. {help}", reason=reason, help=READ_ONLY_HELP
        )

    def startService(self) -> None:
        super().startService()
        if self.journaled.lock is not None:
            self.journaled.lock.recordOwner()
        for warning in self.journaled.warnings:
            _log.warn("kvstore: recovery: {warning}", warning=warning)
        _log.info(
            "kvstore: {count} keys loaded from {dir} (fsync {fsync})",
            count=len(self.journaled), dir=self.journaled.dirpath, fsync=self.fsync,
        )
        self.policy.start()

    # Compaction

    def compact(self) -> None:
        """Start a compaction, unless one is under way.

        Its steps run a piece per reactor turn, and its fsyncs in threads.
        """
        if self._compaction is not None:
            return
        started = time.monotonic()
        # Begin on a reactor turn of its own, never in the middle of a request.
        self._compaction = task.deferLater(self.reactor, 0, self._startCompaction)
        self._compaction.addCallbacks(lambda _: self._compacted(started), self._compactionFailed)

    def _startCompaction(self) -> defer.Deferred[Any] | None:
        if self._stopping:
            return None
        steps = self.journaled.compaction(self._crashpoint)
        cooperator = task.Cooperator(scheduler=lambda f: self.reactor.callLater(0, f))
        return cooperator.cooperate(self._drive(steps)).whenDone()

    def _drive(self, steps: Iterator[Blocking | None]) -> Iterator[defer.Deferred[Any] | None]:
        while True:
            if self._stopping:
                steps.close()
                return
            began = time.monotonic()
            try:
                step = next(steps)
            except StopIteration:
                return
            self.longestCompactionStep = max(self.longestCompactionStep, time.monotonic() - began)
            yield self._runBlocking(step.fn) if isinstance(step, Blocking) else None

    def _compacted(self, started: float) -> None:
        self._compaction = None
        if not self._stopping:
            _log.info(
                "kvstore: compaction done: snapshot {generation} holds {count} keys ({seconds:.2f} s)",
                generation=self.journaled.generation, count=len(self.journaled),
                seconds=time.monotonic() - started,
            )

    def _compactionFailed(self, failure: Failure) -> None:
        self._compaction = None
        _log.failure("kvstore: compaction failed", failure)
        self.journaled.turnReadOnly(f"compaction failed: {failure.value}")

    # Stopping

    def stopService(self) -> defer.Deferred[None]:
        """Finish the compaction step under way, fsync, release waiting replies, close."""
        super().stopService()
        self._stopping = True
        stopped: defer.Deferred[None] = defer.Deferred()
        if self._compaction is None:
            stopped.callback(None)
        else:
            self._compaction.addBoth(lambda _: stopped.callback(None))
        stopped.addCallback(lambda _: self.policy.stop())
        stopped.addCallback(lambda _: self._close())
        # Give the transports a reactor turn to write the released replies
        # before the reactor shuts down and drops the connections.
        stopped.addCallback(lambda _: task.deferLater(self.reactor, 0, lambda: None))
        stopped.addCallback(lambda _: task.deferLater(self.reactor, 0, lambda: None))
        return stopped

    def _close(self) -> None:
        try:
            self.journaled.close()
        except OSError as e:
            _log.critical("kvstore: final fsync of the journal failed: {error}", error=e)

"""When journaled changes reach the disk, and the service that runs it all.

``kvtwist.journaled`` decides what goes in the log; this module decides
when it is made durable (the ``--fsync`` policy), when replies may leave
(``whenDurable``), when to compact, and how to stop cleanly.

- ``always``: group commit.  The first append of a reactor turn schedules
  one fsync for the next turn; until it is done, every reply batch (on
  any connection, gets included) waits, in the order it was produced.
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

from kvtwist.compaction import Blocking, Crashpoint, no_crash
from kvtwist.journaled import JournaledStore

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_FSYNC = "everysec"

READ_ONLY_HELP = (
    "Puts and dels are refused until the server is restarted; gets go on. "
    "Fix the cause (free disk space, replace the failing disk), then restart the server: "
    "recovery replays the journal and drops a torn last record, if any."
)

_log = Logger()


class _Gate:
    """The ``everysec`` and ``no`` policies: replies never wait."""

    def __init__(self, journaled: JournaledStore, reactor: Any) -> None:
        self.journaled = journaled
        self.reactor = reactor

    def appended(self) -> None:
        pass

    def whenDurable(self, f: Callable[..., object], *args: object) -> None:
        f(*args)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class NoSync(_Gate):
    """``--fsync no``."""


class EverySecond(_Gate):
    """``--fsync everysec``: fsync once a second, when anything was appended."""

    interval = 1.0

    def start(self) -> None:
        self._timer = task.LoopingCall(self._sync)
        self._timer.clock = self.reactor
        self._timer.start(self.interval, now=False)

    def _sync(self) -> None:
        if self.journaled.read_only_reason is None and self.journaled.unsynced:
            try:
                self.journaled.sync()
            except OSError:
                pass  # the store is read-only now, and said so

    def stop(self) -> None:
        if self._timer.running:
            self._timer.stop()


class Always(_Gate):
    """``--fsync always``: group commit, one fsync per reactor turn."""

    def __init__(self, journaled: JournaledStore, reactor: Any) -> None:
        super().__init__(journaled, reactor)
        self._waiting: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        self._commit_call: Any = None
        self._failed = False

    def appended(self) -> None:
        if self._commit_call is None:
            self._commit_call = self.reactor.callLater(0, self.commit)

    def whenDurable(self, f: Callable[..., object], *args: object) -> None:
        if self._waiting or (self.journaled.unsynced and not self._failed):
            self._waiting.append((f, args))
            if self._commit_call is None:
                self._commit_call = self.reactor.callLater(0, self.commit)
        else:
            f(*args)

    def commit(self) -> None:
        """Fsync what was appended, then release the replies waiting for it, in order."""
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        waiting, self._waiting = self._waiting, deque()
        if self.journaled.unsynced and not self._failed:
            try:
                self.journaled.sync()
            except OSError:
                # These replies may acknowledge writes that are not on disk:
                # they must not be sent.  Their clients see the connection
                # close instead, as after a crash.
                self._failed = True
                for f, args in waiting:
                    _abortConnectionOf(f)
                return
        for f, args in waiting:
            f(*args)

    def stop(self) -> None:
        self.commit()


def _abortConnectionOf(f: Callable[..., object]) -> None:
    """Close the connection that the reply callable ``f`` would have written to."""
    owner = getattr(f, "__self__", None)
    transport = owner if ITransport.providedBy(owner) else getattr(owner, "transport", None)
    if transport is not None:
        transport.abortConnection()


POLICIES: dict[str, type[_Gate]] = {"always": Always, "everysec": EverySecond, "no": NoSync}


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
        crashpoint: Crashpoint = no_crash,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[assignment]
        self.journaled = journaled
        self.fsync = fsync
        self.reactor = reactor
        self.policy = POLICIES[fsync](journaled, reactor)
        self.whenDurable = self.policy.whenDurable
        self._runBlocking = runBlocking or self._inThread
        self._crashpoint = crashpoint
        self._compaction: task.CooperativeTask | None = None
        self._stopping = False
        self.longestCompactionStep = 0.0
        journaled.on_append = self._appended
        journaled.on_read_only = self._readOnly

    def _inThread(self, fn: Callable[[], object]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn)

    def _appended(self) -> None:
        self.policy.appended()
        if self._compaction is None and self.running and self.journaled.wants_compaction():
            self.compact()

    def _readOnly(self, reason: str) -> None:
        _log.critical(
            "kvstore: THE STORE IS NOW READ-ONLY: {reason}. {help}", reason=reason, help=READ_ONLY_HELP
        )

    def startService(self) -> None:
        super().startService()
        for warning in self.journaled.warnings:
            _log.warn("kvstore: recovery: {warning}", warning=warning)
        _log.info(
            "kvstore: {count} keys loaded from {dir} (fsync {fsync})",
            count=len(self.journaled), dir=self.journaled.dirpath, fsync=self.fsync,
        )
        self.policy.start()

    # Compaction

    def compact(self) -> defer.Deferred[None]:
        """Start a compaction (unless one runs); fires when it is over."""
        if self._compaction is not None:
            return self._compaction.whenDone().addCallback(lambda _: None)
        try:
            steps = self.journaled.compaction(self._crashpoint)
        except OSError as e:
            self._compactionFailed(e)
            return defer.succeed(None)
        started = time.monotonic()
        cooperator = task.Cooperator(scheduler=lambda f: self.reactor.callLater(0, f))
        self._compaction = cooperator.cooperate(self._drive(steps))
        done = self._compaction.whenDone()
        done.addCallbacks(lambda _: self._compacted(started), self._compactionFailed)
        return done

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

    def _compactionFailed(self, failure: Any) -> None:
        self._compaction = None
        error = getattr(failure, "value", failure)
        _log.failure("kvstore: compaction failed", failure if hasattr(failure, "value") else None)
        self.journaled.turn_read_only(f"compaction failed: {error}")

    # Stopping

    def stopService(self) -> defer.Deferred[None]:
        """Finish the compaction step under way, fsync, release waiting replies, close."""
        super().stopService()
        self._stopping = True
        compaction = self._compaction
        waited = compaction.whenDone() if compaction is not None else defer.succeed(None)
        waited.addErrback(lambda f: None)
        waited.addCallback(lambda _: self._close())
        # Give the transports a reactor turn to write the released replies
        # before the reactor shuts down and drops the connections.
        waited.addCallback(lambda _: task.deferLater(self.reactor, 0, lambda: None))
        waited.addCallback(lambda _: task.deferLater(self.reactor, 0, lambda: None))
        return waited

    def _close(self) -> None:
        self.policy.stop()
        try:
            self.journaled.close()
        except OSError as e:
            _log.critical("kvstore: final fsync of the journal failed: {error}", error=e)

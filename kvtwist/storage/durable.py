"""The store with ``--data``: a journaled store run on the reactor, and the service that runs it.

``DurableStore`` is the ``IStore`` the server gets: the journaled store
(``kvtwist.storage.journaled``), whose replies leave as its fsync policy
says (``kvtwist.storage.fsync``), and whose journals are compacted
(``kvtwist.storage.compaction``) once they have grown.
``DurableService`` starts it, and stops it cleanly: the compaction step
under way ends, the journal is fsynced, waiting replies are released.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from kvtwist.storage.compaction import COMPACT_MIN_BYTES, Compactor, Crashpoint, RunBlocking, noCrash
from kvtwist.storage.fsync import POLICIES
from kvtwist.storage.interface import Batch, IReplyTarget
from kvtwist.storage.journaled import JournaledStore, OpenedDirectory
from kvtwist.storage.journalwriter import JournalSyncError

READ_ONLY_HELP = (
    "Puts and dels are refused until the server is restarted; gets go on. "
    "Fix the cause (free disk space, replace the failing disk), then restart the server: "
    "recovery replays the journal and drops a torn last record, if any."
)

_log = Logger()


class DurableStore(JournaledStore):
    """
    The journaled store as an ``IStore``: replies are delivered as the
    fsync policy allows, and each delivery checks whether the journals
    have grown enough to compact.

    ``runBlocking`` runs disk waits off the reactor (a thread by default);
    ``crashpoint`` lets tests stop a compaction at a named step.
    """

    def __init__(
        self,
        opened: OpenedDirectory,
        fsync: str,
        reactor: Any,
        runBlocking: RunBlocking | None = None,
        crashpoint: Crashpoint = noCrash,
        compactMinBytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        super().__init__(opened, holdReplies=POLICIES[fsync].holdsReplies)
        self.fsync = fsync
        self.reactor = reactor
        blocking = runBlocking or _inThreadPool(reactor)
        self.policy = POLICIES[fsync](self, reactor, blocking)
        self.compactor = Compactor(self, reactor, blocking, crashpoint, compactMinBytes)
        # The journals grow only by appends: the size is looked at again
        # only once something was appended since the last look.
        self._sizeCheckedAt = -1

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        self.policy.deliver(target, batch)
        if self.appended != self._sizeCheckedAt:
            self._sizeCheckedAt = self.appended
            self.compactor.startIfDue()

    def readOnlyStarted(self, reason: str) -> None:
        _log.critical("kvstore: THE STORE IS NOW READ-ONLY: {reason}. {help}", reason=reason, help=READ_ONLY_HELP)


def announceStore(store: DurableStore | None, compiledPath: bool = False) -> None:
    """
    Tell the operator which store this is and what recovery found, before the server listens.

    ``None`` stands for the in-memory store, which, free of Twisted, logs
    nothing itself; ``compiledPath`` says whether it runs in C (kvtwist.compiled).
    """
    if store is None:
        _log.info("kvstore: store: memory" + (" (compiled)" if compiledPath else ""))
        return
    _log.info(
        "kvstore: store: data directory {dir} (fsync {fsync}{compiled})",
        dir=store.dirPath,
        fsync=store.fsync,
        compiled=", compiled" if store.compiled is not None else "",
    )
    for warning in store.warnings:
        _log.warn("kvstore: recovery: {warning}", warning=warning)
    _log.info("kvstore: {count} keys loaded from {dir}", count=len(store), dir=store.dirPath)


def _inThreadPool(reactor: IReactorThreads) -> RunBlocking:
    def run(fn: Callable[[], object]) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn)

    return run


class DurableService(service.Service):
    """Runs a ``DurableStore``: its fsync policy while running, and a clean stop."""

    def __init__(self, store: DurableStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        store = self.store
        # twistd may have forked into the background since the lock was taken.
        store.lock.recordOwner()
        store.policy.start()

    def stopService(self) -> defer.Deferred[None]:
        """Finish the compaction step under way, fsync, release waiting replies, close."""
        super().stopService()
        store = self.store
        stopped = store.compactor.stop()
        stopped.addCallback(lambda _: store.policy.stop())
        stopped.addCallback(lambda _: self._close())
        # Give the transports a reactor turn to write the released replies
        # before the reactor shuts down and drops the connections.
        stopped.addCallback(lambda _: task.deferLater(store.reactor, 0, lambda: None))
        stopped.addCallback(lambda _: task.deferLater(store.reactor, 0, lambda: None))
        return stopped

    def _close(self) -> None:
        store = self.store
        try:
            store.close()
        except JournalSyncError as e:
            _log.critical("kvstore: final fsync of the journal failed: {error}", error=e)
        else:
            _log.info(
                "kvstore: journal flushed and fsynced; {count} keys in {dir}", count=len(store), dir=store.dirPath
            )

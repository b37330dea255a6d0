"""
kvtwist's reactor: Twisted's epoll reactor, with the log context of an
event looked up only when something logs.

Twisted's ``EPollReactor.doPoll`` runs every event through
``log.callWithLogger``: for each read it calls the connection's
``logPrefix()``, copies and updates the legacy log context, and pushes it
on the thread's context stack, through four Python frames. That is about
2 µs per event on CPython, a sixth of what a request costs kvtwist without
pipelining (docs/twisted-read-path.md). Only legacy ``log.msg`` and
``log.err`` ever read that context; ``twisted.logger`` events do not.

This reactor pushes one context per poll instead, whose ``system`` is the
``logPrefix()`` of the descriptor being dispatched, worked out when a
legacy log event copies the context, as every reader of it does. A legacy
event logged during a read still carries the connection's prefix, an
exception that escapes a dispatch is still logged with it, and a
``logPrefix`` that raises still gives ``(buggy logPrefix method)``.
docs/twisted-read-path.md proposes the same change to Twisted itself.

The reactor overrides ``doPoll`` and reads three private attributes of
Twisted's epoll reactor (``_poller``, ``_selectables``,
``_doReadOrWrite``). It checks once, when it is made, that this Twisted
has them; if not, every poll is Twisted's own. Like Twisted's epoll
reactor, this module imports only where epoll exists (Linux);
``kvtwist.server.reactorchoice`` decides whether to use it.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.python import context, log

# What doPoll reads or calls on Twisted's EPollReactor, beyond its public methods.
_PRIVATE = ("_poller", "_selectables", "_doReadOrWrite")
BUGGY_PREFIX = "(buggy logPrefix method)"


class _DispatchContext(dict):  # type: ignore[type-arg]
    """
    The legacy log context during a poll's dispatch: the context around the
    poll, with ``system`` the prefix of the descriptor being dispatched.

    Its readers (``log.msg``, ``log.callWithContext``) only ever ``copy()``
    it, so the prefix is worked out there, once per event at most; the
    dict's own items (the outer context) keep it true and readable like
    any context.
    """

    __slots__ = ("current", "_system")

    def __init__(self, outer: dict[str, Any]) -> None:
        super().__init__(outer)
        self.current: Any = None
        self._system: str | None = None

    def dispatching(self, selectable: Any) -> None:
        self.current = selectable
        self._system = None

    def system(self) -> str:
        """The current descriptor's ``logPrefix()``, as ``log.callWithLogger`` would have it."""
        if self._system is None:
            # Set first: a logPrefix that fails is logged, and that log
            # event copies this context again.
            self._system = BUGGY_PREFIX
            try:
                self._system = str(self.current.logPrefix())
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=BUGGY_PREFIX)
        return self._system

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        copied = dict(self)
        if self.current is not None:
            copied["system"] = self.system()
        return copied


class LazyContextEPollReactor(epollreactor.EPollReactor):
    """``EPollReactor`` whose dispatch sets the log context once per poll, not once per event."""

    def __init__(self) -> None:
        super().__init__()
        # Checked once: without these, every poll is Twisted's own.
        self.lazyContext = all(hasattr(self, name) for name in _PRIVATE)

    def doPoll(self, timeout: float | None) -> None:
        if not self.lazyContext:
            return super().doPoll(timeout)
        if timeout is None:
            timeout = -1  # Wait indefinitely.
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            # Interrupted by a signal: the reactor simply polls again. Any
            # other failure is a bug here, as in Twisted's own doPoll.
            if err.errno == errno.EINTR:
                return None
            raise
        if events:
            dispatchContext = _DispatchContext(context.get(log.ILogContext))
            context.call({log.ILogContext: dispatchContext}, self._dispatch, events, dispatchContext)
        return None

    doIteration = doPoll

    def _dispatch(self, events: list[tuple[int, int]], dispatchContext: _DispatchContext) -> None:
        selectables, doReadOrWrite = self._selectables, self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                # Removed by an earlier event of the same poll.
                continue
            dispatchContext.dispatching(selectable)
            try:
                # It logs, and disconnects the descriptor for, whatever its
                # doRead or doWrite raises; what escapes is a reactor bug,
                # logged here (the context gives it the descriptor's prefix).
                doReadOrWrite(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err()
        dispatchContext.dispatching(None)


def install() -> None:
    """Install kvtwist's reactor as the global reactor (``twistd --reactor=kvepoll``)."""
    installReactor(LazyContextEPollReactor())

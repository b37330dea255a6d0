"""
The store boundary: everything the network server knows about where data lives.

The protocol runs each received chunk of requests against an ``IStore``,
one ``put``/``get``/``delete`` per request, passing the chunk's ``Batch``
to every call. The store notes in the batch what the replies depend on
(for a journaled store, the newest journal record they read or wrote).
The protocol then puts the chunk's replies in the batch and hands it to
``deliver``, naming the connection (an ``IReplyTarget``) explicitly. The
store passes the batch back to that connection when the replies may leave:
at once in memory, or once their journal records are on disk with
``--fsync always``.

Everything a reply waits for travels in these arguments. There is no
call-order contract between the store and the protocol, and no state that
a third object rewires at run time.

How the interface is meant to grow, without changing what is here:

- A compiled executor for a whole chunk of an in-process store fills the
  same ``Batch`` (its replies, what they wait for, and per-command counts
  for metrics) and hands it to the same ``deliver``.

A remote engine (``kvtwist.engines``) cannot answer ``get`` before the
engine has answered, so it is an ``IRemoteStore`` instead: one chunk-level
method, the chunk's ``Operation``s in, a Deferred of their ``Outcome``s
out. The protocol formats the outcomes when they come and sends them
itself; it keeps one chunk per connection at the engine, and stops reading
from a connection that sends more meanwhile, so that a connection's
replies stay in order and the requests waiting for an engine are bounded
by the connections. The in-process stores keep the per-key methods, which
answer at once: their fast path pays nothing for the remote one.

No Twisted imports: Deferreds belong to the implementations that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence, Union, runtime_checkable

from kvtwist.histogram import Histogram

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class StoreError(Exception):
    """A request the store refuses as a whole; its text becomes the client's ``Error:`` reply."""

    # What kind of refusal, for the counts by outcome (kvtwist.server.stats).
    kind = "store_error"


class StoreReadOnly(StoreError):
    """The store takes no more changes (a durable store whose disk failed, or that is shutting down)."""

    kind = "read_only"


class StoreFull(StoreError):
    """A put of a new key beyond the store's limit on keys."""

    kind = "store_full"


class StoreUnavailable(StoreError):
    """
    A remote engine did not answer: unreachable, too slow, or the
    connection dropped. The request may or may not have taken effect.
    """

    kind = "unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"store unavailable ({reason})")
        self.reason = reason


# Why a request got StoreUnavailable, for the reasons the protocol documents.
OUTCOME_UNKNOWN = "outcome unknown"
TIMED_OUT = "timeout"
OVERLOADED = "too many requests waiting"


class Batch:
    """
    One chunk of a connection's requests, as the store sees it.

    ``waitFor`` is the newest journal record that the replies depend on
    (0: nothing); ``replies`` the reply lines; ``last`` whether the
    connection closes after them.
    """

    __slots__ = ("waitFor", "replies", "last", "received")

    def __init__(self, replies: bytes = b"", last: bool = False) -> None:
        self.waitFor = 0
        self.replies = replies
        self.last = last
        # When the chunk was read (time.perf_counter), if latency is measured; else 0.
        self.received = 0.0

    def __repr__(self) -> str:
        return f"Batch(waitFor={self.waitFor}, replies={self.replies!r}, last={self.last})"


class IReplyTarget(Protocol):
    """The connection a batch of replies belongs to: the store's only way back to it."""

    def sendReplies(self, batch: Batch) -> None:
        """Write the batch's replies, and close the connection after them if it is the last."""

    def abandonReplies(self) -> None:
        """
        Drop the connection without its replies.

        For replies that can no longer be sent truthfully, such as an
        ``OK`` for a write whose fsync failed: the client sees the
        connection end, as after a crash.
        """


@runtime_checkable
class IStore(Protocol):
    """
    A map from signed 64-bit integers to signed 64-bit integers.

    Keys and values arrive validated; range checks belong to the protocol.
    Each method is atomic with respect to the others. Refusals (a
    read-only store) raise ``StoreError``.
    """

    def put(self, key: int, value: int, batch: Batch) -> bool:
        """Store ``value`` under ``key`` unless the key exists; True if it was stored."""

    def get(self, key: int, batch: Batch) -> int | None:
        """The value under ``key``, or None when there is none."""

    def delete(self, key: int, batch: Batch) -> bool:
        """Remove ``key``; True if it was there."""

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        """
        Pass ``batch`` to ``target.sendReplies`` once its replies may leave.

        The batches of one target are passed back in the order they were
        delivered.
        """

    def __len__(self) -> int:
        """How many keys are stored."""


# The commands of a remote engine's operations.
PUT = 0
GET = 1
DELETE = 2


class Operation(NamedTuple):
    """One request for a remote engine: ``command`` is PUT, GET or DELETE; ``value`` is 0 unless PUT."""

    command: int
    key: int
    value: int = 0


# What one operation came to: for PUT, True if stored and False if the key
# existed; for GET, the value or None; for DELETE, True if the key was there.
# A StoreError (usually StoreUnavailable) for an operation that failed.
Outcome = Union[bool, int, None, StoreError]


class EngineStats:
    """What a remote engine counts for the metrics: plain numbers, read at scrape time."""

    def __init__(self) -> None:
        # Operations sent to the engine, and their round trips (seconds, a chunk at a time).
        self.operations = 0
        self.latency = Histogram((0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        # Failed operations by reason: "timeout", "outcome unknown", "connection refused", ...
        self.errors: dict[str, int] = {}
        # Why the engine is unavailable now (None while it answers): for /healthz.
        self.unavailable: str | None = None

    def failed(self, reason: str, operations: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + operations


@runtime_checkable
class IRemoteStore(Protocol):
    """
    A store kept in another program (Redis, Redis Cluster, etcd), shared by
    many kvtwist nodes.

    ``execute`` runs a chunk's operations, each one atomic in the engine.
    Operations on the same key take effect in the order given. The
    Deferred fires with one outcome per operation, in order, within the
    store's timeout; it never fails: a failed operation's outcome is a
    ``StoreError``. An operation sent to the engine whose answer never
    came is ``StoreUnavailable(OUTCOME_UNKNOWN)`` (or ``TIMED_OUT``): it
    may have happened, and is never reported as done or as not done.
    """

    stats: EngineStats

    def execute(self, operations: Sequence[Operation]) -> Deferred[list[Outcome]]:
        """Run ``operations``; see the class docstring for the promise."""

    def describe(self) -> str:
        """Where the data lives, for the start-up log: the engine's URL, without any password."""

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
- A remote engine cannot answer ``get`` before the engine has answered,
  so it will offer one more, chunk-level method beside these: the
  chunk's requests in, a Deferred of their results out. The protocol
  formats the results when they come and hands the batch to ``deliver``
  like any other, chaining a connection's chunks so that its replies stay
  in order. The in-process stores keep the per-key methods, which answer
  at once: their fast path pays nothing for the remote one.

No Twisted imports: Deferreds belong to the implementations that need them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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

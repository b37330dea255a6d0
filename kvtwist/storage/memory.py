"""The in-memory store: plain Python, no Twisted, so it can be tested and reused alone."""

from __future__ import annotations

import sys
from typing import Iterator

from kvtwist.storage.interface import Batch, IReplyTarget, StoreFull
from kvtwist.storage.intmap import IntMap


STORE_FULL = "store is full"


class MemoryStore:
    """
    The ``IStore`` that keeps everything in memory and answers at once.

    Every method is atomic with respect to the others simply because the
    server is single-threaded: one request runs to completion before the
    next starts. Nothing here is ever waited for, so the batch is only
    passed through.

    The entries live in an ``IntMap`` rather than a dict: about a third of
    the memory per key (docs/performance.md).
    """

    def __init__(self, data: IntMap | None = None, maxKeys: int | None = None) -> None:
        """
        ``data``, if given, becomes the store's contents (recovery fills one).
        With ``maxKeys``, a put of a new key beyond that many is refused, as
        Redis's ``maxmemory`` with ``noeviction`` does; gets and dels go on.
        """
        self._data = IntMap() if data is None else data
        self._count = len(self._data)
        self._room = sys.maxsize if maxKeys is None else maxKeys

    @property
    def full(self) -> bool:
        """Whether a put of a new key would be refused."""
        return self._count >= self._room

    def put(self, key: int, value: int, batch: Batch) -> bool:
        if self._count >= self._room:
            if key in self._data:
                return False
            raise StoreFull(STORE_FULL)
        if self._data.put(key, value):
            self._count += 1
            return True
        return False

    def get(self, key: int, batch: Batch) -> int | None:
        return self._data.get(key)

    def delete(self, key: int, batch: Batch) -> bool:
        if self._data.delete(key):
            self._count -= 1
            return True
        return False

    def deliver(self, target: IReplyTarget, batch: Batch) -> None:
        target.sendReplies(batch)

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (key, value) pair, in no particular order."""
        return self._data.items()

    def keyParts(self) -> Iterator[list[int]]:
        """
        Every key, in parts listed one at a time, so that a snapshot never
        has to list millions of keys in a single reactor turn. A key that
        stays in the store while the parts are taken appears in exactly one.
        """
        return self._data.keyParts()

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return key in self._data

"""The in-memory store: plain Python, no Twisted, so it can be tested and reused alone."""

from __future__ import annotations

from typing import Iterator

from kvtwist.storage.interface import Batch, IReplyTarget
from kvtwist.storage.intmap import IntMap


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

    def __init__(self, data: IntMap | None = None) -> None:
        """``data``, if given, becomes the store's contents (recovery fills one)."""
        self._data = IntMap() if data is None else data

    def put(self, key: int, value: int, batch: Batch) -> bool:
        return self._data.put(key, value)

    def get(self, key: int, batch: Batch) -> int | None:
        return self._data.get(key)

    def delete(self, key: int, batch: Batch) -> bool:
        return self._data.delete(key)

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
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

"""How ``tests/data/v1-datadir`` was made: run with a checkout of commit 148747c on the path.

``python make_v1_datadir.py OUT`` (with ``PYTHONPATH`` naming that
checkout) fills ``OUT/data`` through the ``JournaledStore`` of that
commit, whose journals are format version 1 (no end records), and writes
what the store held when it closed to ``OUT/expected.json``.  One
compaction runs to the end (snapshot 2, journal 2); a second one is
stopped after its switch, so journal 3 holds the newest writes and
journal 2, which it follows, has no end record.  It is kept for the
record: the files it made are the test data, and today's code cannot run
it.
"""

from __future__ import annotations

import json
import os
import sys

from kvtwist.storage.compaction import Blocking
from kvtwist.storage.journaled import JournaledStore


def main(out: str) -> None:
    data = os.path.join(out, "data")
    store = JournaledStore.open(data)

    def churn(n: int) -> None:
        key = n * 37 % 101 - 50
        if n % 5 == 4:
            store.delete(key)
        else:
            store.put(key, n * 1_000_003)

    for key, value in [(0, -1), (-(2**63), 2**63 - 1), (2**63 - 1, -(2**63))]:
        store.put(key, value)
    for n in range(60):
        churn(n)
    # The first compaction, with writes between its steps: snapshot 2, journal 2.
    for n, step in enumerate(store.compaction(chunk=8), start=60):
        if isinstance(step, Blocking):
            step.fn()
        churn(n)
    for n in range(100, 130):
        churn(n)
    # The second one stops once writes go to journal 3, before its snapshot is done.
    steps = store.compaction(chunk=8)
    for step in steps:
        if isinstance(step, Blocking):
            step.fn()
        elif step is None:
            break
    steps.close()
    for n in range(130, 150):
        churn(n)
    store.delete(-(2**63))
    store.close()
    os.remove(os.path.join(data, "LOCK"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(sorted(store.items()), f)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""A process that compacts a data directory and dies at a named step.

``python compaction_child.py DIR ROUND:STEP EXPECTED``: fills DIR through
a ``JournaledStore``, compacts twice while still changing keys between
steps, and at crash point STEP of compaction ROUND writes the state it has acknowledged so far to
EXPECTED (JSON) and exits at once with status 3, as if killed.  If STEP
never comes it exits 0 after compacting twice.
"""

from __future__ import annotations

import json
import os
import sys

from kvtwist.storage.compaction import Blocking, compactionSteps
from kvtwist.storage.interface import Batch
from kvtwist.storage.journaled import JournaledStore, openDirectory


def main(dirpath: str, step: str, expected: str) -> int:
    journaled = JournaledStore(openDirectory(dirpath))
    batch = Batch()
    counter = iter(range(10**9))
    current = {"round": 0}

    def churn(count: int) -> None:
        for _ in range(count):
            n = next(counter)
            journaled.put(n, n * 7, batch)
            if n % 4 == 3:
                journaled.delete(n - 2, batch)

    def crashpoint(name: str) -> None:
        if f"{current['round']}:{name}" == step:
            with open(expected, "w") as f:
                json.dump(sorted(journaled.items()), f)
            os._exit(3)

    churn(5000)
    for current["round"] in (1, 2):
        steps = compactionSteps(journaled, crashpoint, chunk=500)
        for item in steps:
            if isinstance(item, Blocking):
                item.fn()
            churn(50)
        churn(300)
    journaled.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

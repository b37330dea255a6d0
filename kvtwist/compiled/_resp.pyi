"""Types of the extension built from _resp.pyx."""

from typing import Sequence

from kvtwist.storage.interface import Operation, Outcome

def encodeCommands(operations: Sequence[Operation], prefix: bytes) -> bytes: ...
def decodeOutcomes(operations: Sequence[Operation], replies: list[object]) -> list[Outcome] | None: ...

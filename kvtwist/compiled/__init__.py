"""
The compiled path, three parts:

- ``CompiledStore``, the in-memory store as a C hash map, whose
  ``runChunk`` runs a received chunk's common requests at C level
  (``runJournaledChunk`` the same for a data directory, with the journal's
  records), and ``ChunkRunner``, the server's fast path over it, which
  counts in C what it runs;
- for a remote engine, ``remotePath``: its ``parseChunk`` turns a chunk
  into operations, and its ``formatOutcomes`` the engine's answers into
  replies;
- for Redis, ``respPath``: its ``encodeCommands`` writes a chunk's
  commands, and its ``decodeOutcomes`` reads Redis's replies to them.

It exists only where the optional extension was built (CPython with a C
compiler). All of them are None otherwise, or when the environment sets
``KVTWIST_PURE=1`` to compare both paths in one tree, and ``unavailable``
then says why. The pure-Python path (``MemoryStore`` and
the protocol's own parser, the Redis engine's encoder) is the reference
and works everywhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from types import ModuleType

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import ChunkRunner as _ChunkRunner, CompiledStore as _CompiledStore

CompiledStore: type[_CompiledStore] | None
ChunkRunner: type[_ChunkRunner] | None
# The remote engines' path: parseChunk and formatOutcomes, or None.
remotePath: ModuleType | None
# The Redis engine's path: encodeCommands and decodeOutcomes, or None.
respPath: ModuleType | None
# Why there is no compiled path (None when there is one).
unavailable: str | None

if os.environ.get("KVTWIST_PURE") == "1":
    CompiledStore, ChunkRunner, remotePath, respPath = None, None, None, None
    unavailable = "disabled by KVTWIST_PURE=1"
else:
    try:
        from kvtwist.compiled._chunk import ChunkRunner, CompiledStore
        from kvtwist.compiled import _chunk as remotePath
        from kvtwist.compiled import _resp as respPath
    except ImportError as e:
        CompiledStore, ChunkRunner, remotePath, respPath = None, None, None, None
        unavailable = f"the extension is not built ({e})"
    else:
        unavailable = None

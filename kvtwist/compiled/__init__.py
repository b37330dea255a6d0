"""
The compiled path: ``CompiledStore``, the in-memory store as a C hash map,
whose ``runChunk`` runs a received chunk's common requests at C level;
and for a remote engine, ``remotePath``: its ``parseChunk`` turns a chunk
into operations, and its ``formatOutcomes`` the engine's answers into
replies, also at C level.

It exists only where the optional extension was built (CPython with a C
compiler). ``CompiledStore`` and ``remotePath`` are None otherwise, or when the environment
sets ``KVTWIST_PURE=1`` to compare both paths in one tree, and
``unavailable`` then says why. The pure-Python path (``MemoryStore`` and
the protocol's own parser) is the reference and works everywhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from types import ModuleType

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import CompiledStore as _CompiledStore

CompiledStore: type[_CompiledStore] | None
# The remote engines' path: parseChunk and formatOutcomes, or None.
remotePath: ModuleType | None
# Why there is no compiled path (None when there is one).
unavailable: str | None

if os.environ.get("KVTWIST_PURE") == "1":
    CompiledStore, remotePath, unavailable = None, None, "disabled by KVTWIST_PURE=1"
else:
    try:
        from kvtwist.compiled._chunk import CompiledStore
        from kvtwist.compiled import _chunk as remotePath
    except ImportError as e:
        CompiledStore, remotePath, unavailable = None, None, f"the extension is not built ({e})"
    else:
        unavailable = None

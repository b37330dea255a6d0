"""Integration: what a real ``twistd -n kvstore`` tells the operator, in order, from start-up to SIGTERM."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from kvtwist.storage import journal
from kvtwist.storage.datadir import journalName
from kvtwist import compiled
from kvtwist.version import version
from serverproc import ServerProcess, session, start_server

# twistd's log lines: "2026-01-01T00:00:00+0000 [namespace#level] message".
_LOG_LINE = re.compile(r"^\S+ \[[^\]]*\] (kvstore.*)$", re.MULTILINE)


# The in-memory store's start-up line: it says whether the compiled path runs.
MEMORY_LINE = "kvstore: store: memory" + (" (compiled)" if compiled.CompiledStore is not None else "")
# How the data directory's line ends where its requests run in C.
COMPILED = ", compiled" if compiled.CompiledStore is not None else ""


def kvstoreLines(server: ServerProcess) -> list[str]:
    """Every line kvtwist logged (they all start with "kvstore"), in order."""
    return _LOG_LINE.findall(server.log_text())


def listening(server: ServerProcess) -> str:
    return f"kvstore listening on IPv4Address(type='TCP', host='127.0.0.1', port={server.port})"


def test_in_memory_it_says_what_it_is_then_where_it_listens() -> None:
    server = start_server()
    assert session(server, b"put 1 1\nget 1\n") == b"OK\n1\nGoodbye\n"
    assert server.stop() == -signal.SIGTERM
    assert kvstoreLines(server) == [
        f"kvstore: kvtwist {version()} starting",
        MEMORY_LINE,
        listening(server),
    ], "once each, nothing per request"


def test_with_data_it_says_what_it_loaded_before_it_listens_and_what_it_kept_after_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data))
    assert session(server, b"put 1 1\nput 2 2\nget 1\n") == b"OK\nOK\n1\nGoodbye\n"
    assert server.stop() == -signal.SIGTERM
    assert kvstoreLines(server) == [
        f"kvstore: kvtwist {version()} starting",
        f"kvstore: store: data directory {data} (fsync everysec{COMPILED})",
        f"kvstore: 0 keys loaded from {data}",
        listening(server),
        f"kvstore: journal flushed and fsynced; 2 keys in {data}",
    ]

    # What recovery dropped comes between the store and what it loaded.
    path = data / journalName(1)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(journal.encodePut(3, 3)[:11])
    restarted = start_server("--data", str(data), "--fsync", "always")
    assert restarted.stop() == -signal.SIGTERM
    [dropped] = [line for line in kvstoreLines(restarted) if line.startswith("kvstore: recovery: ")]
    assert f"dropped a torn record at the end of {path} at offset {good}" in dropped
    assert kvstoreLines(restarted) == [
        f"kvstore: kvtwist {version()} starting",
        f"kvstore: store: data directory {data} (fsync always{COMPILED})",
        dropped,
        f"kvstore: 2 keys loaded from {data}",
        listening(restarted),
        f"kvstore: journal flushed and fsynced; 2 keys in {data}",
    ]

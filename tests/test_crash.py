"""Crashes with real processes: nothing acknowledged is ever lost.

- A server under load from 16 clients is killed with SIGKILL, under
  ``--fsync always`` and ``everysec``; after a restart every acknowledged
  put is there and every acknowledged del is gone.
- A process compacting its data directory dies at each step of the
  compaction; the directory then recovers to exactly what it acknowledged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvtwist.storage.recovery import recover
from serverproc import ServerProcess, start_server

CLIENTS = 16


class Client(threading.Thread):
    """Puts fresh keys and deletes some of its own, remembering what was acknowledged."""

    def __init__(self, server: ServerProcess, number: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.base = number * 10**9
        self.stop = stop
        self.present: dict[int, int] = {}
        self.deleted: set[int] = set()
        self.inflight: int | None = None
        self.acknowledged = 0

    def run(self) -> None:
        sock = self.server.connect()
        replies = sock.makefile("rb")
        try:
            for n in range(10**9):
                if self.stop.is_set():
                    return
                if n % 3 == 2 and self.present:
                    key = next(iter(self.present))
                    request = b"del %d\n" % key
                else:
                    key = self.base + n
                    request = b"put %d %d\n" % (key, key * 3 + 1)
                self.inflight = key
                sock.sendall(request)
                if replies.readline() != b"OK\n":
                    return  # the server died: this request is in flight
                if key in self.present:
                    del self.present[key]
                    self.deleted.add(key)
                else:
                    self.present[key] = key * 3 + 1
                self.inflight = None
                self.acknowledged += 1
        except OSError:
            return
        finally:
            sock.close()


def get_all(server: ServerProcess, keys: list[int]) -> dict[int, bytes]:
    """One pipelined ``get`` per key, over one connection."""
    with server.connect() as sock:
        sock.sendall(b"".join(b"get %d\n" % k for k in keys))
        replies = sock.makefile("rb")
        return {k: replies.readline().rstrip(b"\n") for k in keys}


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path, fsync) -> None:
    data = str(tmp_path / "data")
    server = start_server("--data", data, "--fsync", fsync)
    stop = threading.Event()
    clients = [Client(server, i, stop) for i in range(CLIENTS)]
    try:
        for client in clients:
            client.start()
        deadline = time.monotonic() + 20
        while sum(c.acknowledged for c in clients) < 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()
    finally:
        stop.set()
        server.kill()
    for client in clients:
        client.join(10)
    assert sum(c.acknowledged for c in clients) >= 200, "too few writes to prove anything"

    restarted = start_server("--data", data, "--fsync", fsync)
    try:
        keys = [k for c in clients for k in [*c.present, *c.deleted] if k != c.inflight]
        found = get_all(restarted, keys)
    finally:
        restarted.stop()
    lost = [k for c in clients for k, v in c.present.items() if k != c.inflight and found[k] != b"%d" % v]
    resurrected = [k for c in clients for k in c.deleted if k != c.inflight and found[k] != b"Key not found"]
    assert (lost, resurrected) == ([], [])


COMPACTION_STEPS = [
    "old journal synced",
    "new journal written",
    "new journal renamed",
    "new journal durable",
    "snapshot partly written",
    "snapshot written",
    "snapshot synced",
    "snapshot renamed",
    "snapshot durable",
    "old files removed",
]


@pytest.mark.parametrize("round", [1, 2])
@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_a_crash_at_each_step_of_compaction_recovers(tmp_path, step, round) -> None:
    data, expected = tmp_path / "data", tmp_path / "expected.json"
    child = Path(__file__).with_name("compaction_child.py")
    result = subprocess.run(
        [sys.executable, str(child), str(data), f"{round}:{step}", str(expected)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3, f"the child did not reach {step!r}: {result.stderr}"
    recovered = recover(str(data))
    assert sorted(recovered.map.items()) == [tuple(pair) for pair in json.loads(expected.read_text())]
    assert not recovered.warnings


def test_the_compaction_child_really_compacts(tmp_path) -> None:
    """Without a crash the child's two compactions leave one snapshot and one journal."""
    data = tmp_path / "data"
    child = Path(__file__).with_name("compaction_child.py")
    result = subprocess.run(
        [sys.executable, str(child), str(data), "never", str(tmp_path / "unused")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["LOCK", "journal-00000003.kvj", "snapshot-00000003.kvs"]

"""docs/operating.md: the systemd unit, the health probe, and the backup script run against live data directories."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtwist.server.factory import DEFAULT_MAX_CONNECTIONS
from kvtwist.storage.compaction import COMPACT_MIN_BYTES, Blocking, compactionSteps
from kvtwist.storage.datadir import LOCK_NAME, journalName, snapshotName
from kvtwist.storage.interface import Batch, StoreReadOnly
from kvtwist.storage.journal import RECORD_SIZE
from kvtwist.storage.journaled import JournaledStore, openDirectory
from kvtwist.storage.recovery import recover
from kvtwist.tap import Options
from serverproc import ServerProcess, start_server, twistd
from serverproc import session

DOCS = Path(__file__).resolve().parent.parent / "docs"
UNIT = DOCS / "kvtwist.service"
OPERATING = DOCS / "operating.md"
UNIT_TWISTD = "/opt/kvtwist/.venv/bin/twistd"
SNAPSHOT_2 = snapshotName(2)


def unitSettings() -> dict[str, str]:
    """The unit's ``Key=value`` lines (each key is set once)."""
    found = {}
    for line in UNIT.read_text().splitlines():
        if line and line[0].isalpha() and "=" in line:
            key, _, value = line.partition("=")
            assert key not in found, f"{key} is set twice"
            found[key] = value
    return found


# The systemd unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt: systemd)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    # verify insists that the ExecStart program exists: point it at this
    # environment's twistd and check everything else as written.
    text = UNIT.read_text()
    assert UNIT_TWISTD in text
    unit = tmp_path / "kvtwist.service"
    unit.write_text(text.replace(UNIT_TWISTD, twistd()))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # It exits 0 even for unknown keys and bad values, and says so on stderr.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_units_command_is_one_kvstore_accepts() -> None:
    unit = unitSettings()
    command = shlex.split(unit["ExecStart"])
    assert command[:4] == [UNIT_TWISTD, "-n", "--pidfile=", "kvstore"]
    options = Options()
    options.parseOptions(command[4:])
    assert options["data"] == "/var/lib/kvtwist"
    assert unit["StateDirectory"] == "kvtwist" and unit["ReadWritePaths"] == options["data"]
    assert unit["KillSignal"] == "SIGTERM"
    # The server keeps 64 descriptors beside its clients (kvtwist/server/listening.py).
    assert int(unit["LimitNOFILE"]) >= DEFAULT_MAX_CONNECTIONS + 64


# The health probe: del of an unused key


def test_the_probe_changes_nothing_on_a_writable_server(tmp_path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data))
    try:
        assert session(server, b"put 1 1\n") == b"OK\nGoodbye\n"
        size = (data / journalName(1)).stat().st_size
        assert session(server, b"del -9223372036854775808\n") == b"Key not found\nGoodbye\n"
        assert (data / journalName(1)).stat().st_size == size
    finally:
        server.stop()


def test_the_probe_reports_a_read_only_store(tmp_path) -> None:
    store = JournaledStore(openDirectory(str(tmp_path)))
    try:
        assert store.delete(-(2**63), Batch()) is False
        store.turnReadOnly("journal write failed: No space left on device")
        with pytest.raises(StoreReadOnly, match=r"store is read-only \(journal write failed"):
            store.delete(-(2**63), Batch())
    finally:
        store.close()


# The backup script


def backupScript(directory: Path) -> Path:
    """Write the script docs/operating.md gives, exactly, into ``directory``."""
    blocks = re.findall(r"```sh\n(#!/bin/sh\n# kvtwist-backup .*?)```", OPERATING.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/operating.md should hold one kvtwist-backup script"
    path = directory / "kvtwist-backup"
    path.write_text(blocks[0])
    path.chmod(0o755)
    return path


def backupFiles(dest: Path) -> list[str]:
    names = sorted(os.listdir(dest))
    assert LOCK_NAME not in names and not [n for n in names if n.endswith(".tmp")]
    return names


def contents(dirPath: Path) -> dict[int, int]:
    """What a server started on ``dirPath`` would serve (nothing is changed)."""
    return dict(recover(str(dirPath), truncateTorn=False).map.items())


# Against a directory frozen at every step: ``world/N`` is the data
# directory after step N of a writer that compacts twice.  The script reads
# ``src``, a link to one of them; a ``cp`` or ``ls`` of our own, first on
# its PATH, moves the link on as far as the schedule says before running
# the real command.  So the directory changes between any two commands of
# the script, exactly as chosen.

_SHIM = """#!/bin/sh
ctl={ctl}
calls=$(cat "$ctl/calls")
echo $((calls + 1)) > "$ctl/calls"
next=$(sed -n "$((calls + 1))p" "$ctl/schedule")
if [ -n "$next" ]; then
    ln -sfn "$ctl/world/$next" "$ctl/src"
fi
exec {real} "$@"
"""


class FrozenHistory:
    """A data directory saved at every step of writes and two compactions, and the store's contents then."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.states: list[dict[int, int]] = []
        live = root / "live"
        store = JournaledStore(openDirectory(str(live)))
        batch = Batch()
        counter = iter(range(10**6))

        def save() -> None:
            saved = root / "world" / str(len(self.states))
            saved.mkdir(parents=True)
            for path in live.iterdir():
                if path.name != LOCK_NAME:
                    shutil.copyfile(path, saved / path.name)
            self.states.append(dict(store.items()))

        def write() -> None:
            n = next(counter)
            store.put(n, n * 7, batch)
            if n % 3 == 2:
                store.delete(n - 1, batch)
            save()

        save()
        for _ in range(12):
            write()
        for _ in range(2):
            for step in compactionSteps(store, chunk=4):
                if isinstance(step, Blocking):
                    step.fn()
                save()
                write()
            write()
        store.close()

    def run(
        self, script: Path, start: int, schedule: list[int], dest: Path
    ) -> tuple[int, subprocess.CompletedProcess[str]]:
        """Run ``script`` on the directory of step ``start``, moving on as ``schedule`` says; return the last step."""
        ctl = self.root
        (ctl / "calls").write_text("0")
        (ctl / "schedule").write_text("".join(f"{step}\n" for step in schedule))
        (ctl / "src").unlink(missing_ok=True)
        (ctl / "src").symlink_to(ctl / "world" / str(start))
        shims = ctl / "shims"
        if not shims.exists():
            shims.mkdir()
            for command in ("cp", "ls"):
                real = shutil.which(command)
                assert real is not None
                (shims / command).write_text(_SHIM.format(ctl=shlex.quote(str(ctl)), real=shlex.quote(real)))
                (shims / command).chmod(0o755)
        env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(
            ["sh", str(script), str(ctl / "src"), str(dest)], capture_output=True, text=True, env=env, timeout=60
        )
        return int(os.readlink(ctl / "src").rsplit("/", 1)[1]), result

    def check(self, script: Path, start: int, moves: list[int], dest: Path) -> None:
        """The copy made from step ``start`` on recovers to the state of one step from ``start`` to the last one."""
        last = len(self.states) - 1
        schedule, step = [], start
        for move in moves:
            step = min(step + move, last)
            schedule.append(step)
        end, result = self.run(script, start, schedule, dest)
        assert result.returncode == 0, result.stderr
        backupFiles(dest)
        recovered = contents(dest)
        assert recovered in self.states[start : end + 1], (start, schedule, result.stderr)


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> FrozenHistory:
    return FrozenHistory(tmp_path_factory.mktemp("history"))


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    return backupScript(tmp_path_factory.mktemp("script"))


def newDest(history: FrozenHistory) -> Path:
    dests = history.root / "dests"
    dests.mkdir(exist_ok=True)
    return dests / str(len(os.listdir(dests)))


@dataclass(frozen=True)
class Compaction:
    """Steps of a compaction in the history: the first step with the newer
    journal, the first with records in it, the first without the older one."""

    created: int
    written: int
    removed: int


def compactions(history: FrozenHistory) -> list[Compaction]:
    found = []
    for generation in (2, 3):
        newer, older = {}, []
        for step in range(len(history.states)):
            saved = history.root / "world" / str(step)
            if (saved / journalName(generation)).exists():
                newer[step] = (saved / journalName(generation)).stat().st_size
            if (saved / journalName(generation - 1)).exists():
                older.append(step)
        created = min(newer)
        written = min(step for step, size in newer.items() if size > newer[created])
        found.append(Compaction(created, written, removed=max(older) + 1))
    return found


def test_the_history_has_two_compactions(history) -> None:
    first, second = compactions(history)
    assert first.created < first.written < first.removed < second.created < second.written < second.removed
    final = os.listdir(history.root / "world" / str(len(history.states) - 1))
    assert sorted(final) == [journalName(3), snapshotName(3)]


def test_a_switch_between_two_journal_copies(history, script) -> None:
    # The list taken while both journals are there, before the switch; one
    # journal copied, then the switch and writes to the newer, then the other.
    for compaction in compactions(history):
        for start in range(compaction.created, compaction.written):
            for later in range(compaction.written - start, compaction.written - start + 3):
                history.check(script, start, [0, 0, later], newDest(history))


def test_a_compaction_after_the_list_is_taken(history, script) -> None:
    # A journal appears, the older one ends (it names the newer), or it is
    # gone before it is copied: each time the script must copy again.
    for compaction in compactions(history):
        for start in range(compaction.created - 3, compaction.created):
            for moment in (compaction.created, compaction.written, compaction.removed):
                for moves in ([moment - start], [0, moment - start], [0, 0, moment - start]):
                    history.check(script, start, moves, newDest(history))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_interleaving_of_the_script_and_two_compactions(history, script, data) -> None:
    start = data.draw(st.integers(0, len(history.states) - 1), label="start")
    moves = data.draw(st.lists(st.integers(0, 4), max_size=14), label="moves")
    history.check(script, start, moves, newDest(history))


# Against a real server under load


class Writers:
    """Clients that each put keys 0, 1, 2, ... of their own, pipelined, and count what was acknowledged."""

    CHUNK = 1000

    def __init__(self, server: ServerProcess, clients: int, until: int) -> None:
        self.acked = [0] * clients
        self.until = until
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._write, args=(server, i), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def key(client: int, n: int) -> int:
        return client * 10**9 + n

    def _write(self, server: ServerProcess, client: int) -> None:
        try:
            with server.connect(timeout=60) as sock:
                while sum(self.acked) < self.until:
                    n = self.acked[client]
                    sock.sendall(b"".join(b"put %d %d\n" % (self.key(client, k), k) for k in range(n, n + self.CHUNK)))
                    replies = b""
                    while len(replies) < 3 * self.CHUNK:
                        chunk = sock.recv(65536)
                        assert chunk, "the server closed the connection"
                        replies += chunk
                    assert replies == b"OK\n" * self.CHUNK
                    self.acked[client] = n + self.CHUNK
        except BaseException as e:
            self.errors.append(e)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)
        assert not self.errors, self.errors


def waitFor(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def checkPrefixes(recovered: dict[int, int], clients: int, before: list[int], sent: list[int]) -> list[int]:
    """Each client's keys are 0..m-1, with m at least what was acknowledged before the copy; return the m's."""
    count, top = [0] * clients, [-1] * clients
    for key, value in recovered.items():
        client, n = divmod(key, 10**9)
        assert 0 <= client < clients and value == n, (key, value)
        count[client] += 1
        top[client] = max(top[client], n)
    assert count == [t + 1 for t in top], "a key is missing below a later one"
    assert all(b <= c <= s for b, c, s in zip(before, count, sent)), (before, count, sent)
    return count


def test_a_copy_taken_while_clients_write_and_the_server_compacts_recovers(tmp_path) -> None:
    data = tmp_path / "data"
    script = backupScript(tmp_path)
    server = start_server("--data", str(data))
    clients = 4
    # Copies from a while before the first compaction (at 8 MiB of journal)
    # until one holds the snapshot it writes.
    compaction = COMPACT_MIN_BYTES // RECORD_SIZE
    writers = Writers(server, clients, until=compaction + 40_000)
    copies: list[tuple[Path, list[int], list[str]]] = []
    try:
        waitFor(lambda: sum(writers.acked) >= compaction - 40_000 or not writers.running(), timeout=60)
        deadline = time.monotonic() + 30
        while writers.running() or not any(SNAPSHOT_2 in names for _, _, names in copies):
            assert time.monotonic() < deadline, f"no compaction: {[names for _, _, names in copies]}"
            before = list(writers.acked)
            dest = tmp_path / f"copy{len(copies)}"
            result = subprocess.run(
                ["sh", str(script), str(data), str(dest)], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr
            copies.append((dest, before, backupFiles(dest)))
            time.sleep(0.2)
        writers.join()
    finally:
        server.stop()
    sent = list(writers.acked)
    assert copies[0][2] == [journalName(1)], "the first copy came after the compaction"

    counts = {dest: checkPrefixes(contents(dest), clients, before, sent) for dest, before, _ in copies}

    # Servers started on the last copy before the compaction, on one taken
    # during it (two journals) if there is one, and on the last copy.
    during = [dest for dest, _, names in copies if len(names) > 1 and SNAPSHOT_2 not in names]
    chosen = [[dest for dest, _, names in copies if names == [journalName(1)]][-1], *during[:1], copies[-1][0]]
    for dest in chosen:
        restored = start_server("--data", str(dest))
        try:
            probes = b"".join(
                b"get %d\nget %d\n" % (Writers.key(c, m - 1), Writers.key(c, m)) for c, m in enumerate(counts[dest])
            )
            expected = b"".join(b"%d\nKey not found\n" % (m - 1) for m in counts[dest])
            assert session(restored, probes + b"put -1 1\nget -1\n") == expected + b"OK\n1\nGoodbye\n"
            assert f"{sum(counts[dest])} keys loaded" in restored.log_text()
        finally:
            assert restored.stop() == -signal.SIGTERM

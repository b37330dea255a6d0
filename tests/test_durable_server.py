"""``twistd kvstore --data DIR`` as a real process: restarts, the lock, SIGTERM, damaged journals."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from journalfiles import flip_byte, record_offset
from kvtwist.storage import journal
from kvtwist.storage.datadir import journalName
from serverproc import session, start_server, twistd


def start_failing(data) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start."""
    return subprocess.run(
        [twistd(), "-n", "--pidfile=", "kvstore", "--port", "tcp:0:interface=127.0.0.1", "--data", str(data)],
        capture_output=True, text=True, timeout=60, cwd=data.parent,
    )


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_sigterm_keeps_everything_and_exits_as_twistd_does(tmp_path, fsync) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data), "--fsync", fsync)
    assert session(server, b"put 1 10\nput 2 20\ndel 1\nput 3 30\n") == b"OK\nOK\nOK\nOK\nGoodbye\n"
    assert server.stop(signal.SIGTERM) == -signal.SIGTERM
    restarted = start_server("--data", str(data))
    try:
        assert session(restarted, b"get 1\nget 2\nget 3\n") == b"Key not found\n20\n30\nGoodbye\n"
        assert "2 keys loaded" in restarted.log_text()
    finally:
        restarted.stop()


def test_replies_pending_at_sigterm_are_sent(tmp_path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data), "--fsync", "always")
    requests = b"".join(b"put %d %d\n" % (k, k) for k in range(20000))
    with server.connect() as sock:
        sock.sendall(requests)
        first = sock.recv(3)
        server.proc.send_signal(signal.SIGTERM)
        chunks = [first]
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # closed with requests still unread: the kernel resets instead of closing
    assert server.proc.wait(30) == -signal.SIGTERM
    replies = b"".join(chunks).split(b"\n")[:-1]
    answered = replies.count(b"OK")
    late = b"Error: store is read-only (the server is shutting down)"
    assert answered and replies == [b"OK"] * answered + [late] * (len(replies) - answered)
    restarted = start_server("--data", str(data))
    try:
        gets = b"".join(b"get %d\n" % k for k in range(answered))
        assert session(restarted, gets) == b"".join(b"%d\n" % k for k in range(answered)) + b"Goodbye\n"
    finally:
        restarted.stop()


def test_a_second_server_on_the_same_directory_exits_with_a_message(tmp_path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data))
    try:
        result = start_failing(data)
        assert result.returncode != 0
        assert f"{data} is in use by another kvtwist server (pid {server.proc.pid})" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        server.stop()


def test_a_torn_tail_is_dropped_with_a_warning_after_kill_9(tmp_path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data))
    session(server, b"put 1 1\nput 2 2\n")
    server.kill()
    path = data / journalName(1)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(journal.encodePut(3, 3)[:11])
    restarted = start_server("--data", str(data))
    try:
        assert session(restarted, b"get 2\nget 3\n") == b"2\nKey not found\nGoodbye\n"
        log = restarted.log_text()
        assert f"dropped a torn record at the end of {path} at offset {good}" in log
    finally:
        restarted.stop()
    assert path.stat().st_size == good


def test_a_corrupt_record_refuses_start_until_repaired(tmp_path) -> None:
    data = tmp_path / "data"
    server = start_server("--data", str(data))
    session(server, b"put 1 1\nput 2 2\nput 3 3\n")
    server.stop()
    path = data / journalName(1)
    flip_byte(path, record_offset(1) + 2)

    result = start_failing(data)
    assert result.returncode != 0
    message = result.stderr
    assert f"{path} at offset {record_offset(1)}" in message and f"kvtwist-repair {data}" in message
    assert "Traceback" not in message

    repaired = subprocess.run([sys.executable, "-m", "kvtwist.storage.repair", str(data)], capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr
    server = start_server("--data", str(data))
    try:
        assert session(server, b"get 1\nget 2\n") == b"1\nKey not found\nGoodbye\n"
    finally:
        server.stop()


def test_without_data_nothing_is_written(tmp_path) -> None:
    server = start_server(cwd=tmp_path)
    session(server, b"put 1 1\n")
    server.stop()
    assert list(tmp_path.iterdir()) == []

"""Integration: where a real ``twistd kvstore`` listens, how it fails to, and its open-file limit."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serverproc import ServerProcess, exchange, start_server, twistd

_LISTENING = re.compile(r"kvstore listening on (.*)")


def _hasIPv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _hasIPv6Loopback()


def freeLoopbackPort() -> int:
    """A port number free on 127.0.0.1 and, where there is IPv6, on ::1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            number: int = s.getsockname()[1]
        if not HAS_IPV6:
            return number
        try:
            with socket.socket(socket.AF_INET6) as s6:
                s6.bind(("::1", number))
        except OSError:
            continue
        return number
    raise RuntimeError("no port free on both loopback addresses")


def listeningLines(server: ServerProcess, count: int) -> list[str]:
    """The addresses the server logged it listens on, once it has logged ``count`` of them."""
    deadline = time.monotonic() + 10
    while len(lines := _LISTENING.findall(server.log_text())) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def ask(sock: socket.socket, request: bytes) -> bytes:
    """Send one request and read its one reply line."""
    return exchange(sock, request, 1).rstrip(b"\n")


def readToEnd(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_a_bare_port_listens_on_loopback_only() -> None:
    number = freeLoopbackPort()
    server = start_server(port=str(number))
    try:
        expected = [f"IPv4Address(type='TCP', host='127.0.0.1', port={number})"]
        if HAS_IPV6:
            expected.append(f"IPv6Address(type='TCP', host='::1', port={number}, flowInfo=0, scopeID=0)")
        assert listeningLines(server, len(expected)) == expected
        hosts = ["127.0.0.1", "::1"] if HAS_IPV6 else ["127.0.0.1"]
        for i, host in enumerate(hosts):
            with socket.create_connection((host, number), timeout=10) as sock:
                assert ask(sock, b"put %d 1\n" % i) == b"OK"
        assert "reachable from other machines" not in server.log_text()
    finally:
        server.stop()


def test_every_port_is_logged_and_serves_the_one_store(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    server = start_server("--port", f"unix:{path}")
    try:
        assert len(listeningLines(server, 2)) == 2
        with server.connect() as sock:
            assert ask(sock, b"put 1 2\n") == b"OK"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            assert ask(sock, b"get 1\n") == b"2"
    finally:
        server.stop()


@pytest.mark.parametrize("options, mode", [("", 0o600), (":mode=660", 0o660)])
def test_a_unix_socket_is_private_unless_mode_says_otherwise(tmp_path: Path, options: str, mode: int) -> None:
    path = tmp_path / "kv.sock"
    # With umask 000, whatever the mode is comes from the server.
    server = start_server(port=f"unix:{path}{options}", preexec_fn=lambda: os.umask(0))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == mode
    finally:
        server.stop()


def _killDaemon(pidfile: Path) -> None:
    """End a daemon that started although it should not have."""
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass


def test_a_daemon_on_a_busy_port_exits_with_the_reason(tmp_path: Path) -> None:
    # Before, the daemonizing parent waited forever for word from its child.
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        started = time.monotonic()
        try:
            result = subprocess.run(
                [twistd(), "--pidfile", str(pidfile), "--logfile", str(logfile), "kvstore", "--port", str(number)],
                cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            )
        finally:
            _killDaemon(pidfile)
    assert result.returncode == 1
    assert time.monotonic() - started < 20
    assert f"Address already in use (tcp:{number}:interface=127.0.0.1)" in result.stderr
    assert f"kvstore: cannot listen on tcp:{number}:interface=127.0.0.1: Address already in use" in logfile.read_text()


@pytest.mark.parametrize("runner", [[twistd(), "-n", "--pidfile="], [str(Path(sys.executable).with_name("twist"))]])
def test_in_the_foreground_a_busy_port_is_one_line(tmp_path: Path, runner: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        result = subprocess.run([*runner, "kvstore", "--port", str(number)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"kvstore: cannot listen on tcp:{number}:interface=127.0.0.1: Address already in use\n" in output
    assert "Traceback" not in output


def test_a_low_open_file_limit_lowers_the_connection_limit() -> None:
    # 200 descriptors, which the server may not raise: 64 stay spare, so
    # 136 clients are served, and the next ones are told why they are not.
    def lowLimit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    server = start_server("--max-connections", "400", preexec_fn=lowLimit)
    served: list[socket.socket] = []
    refused: list[socket.socket] = []
    try:
        assert "serving at most 136 clients at once instead of --max-connections 400" in server.log_text()
        for i in range(136):
            served.append(server.connect())
            served[-1].sendall(b"put %d 1\n" % i)
        assert [ask(s, b"") for s in served] == [b"OK"] * 136
        for _ in range(100):
            refused.append(server.connect())
            assert readToEnd(refused[-1]) == b"Error: too many connections\n"
        assert ask(served[0], b"get 135\n") == b"1"
    finally:
        for s in served + refused:
            s.close()
        server.stop()

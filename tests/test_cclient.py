"""The C client, client.c, built with gcc and run against real ``twistd -n kvstore`` processes."""

from __future__ import annotations

import os
import pty
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from serverproc import ServerProcess, start_server

ROOT = Path(__file__).parent.parent
WARNINGS = ["-Wall", "-Wextra", "-Werror"]

SESSION_INPUT = "put 1 2\nput 1 3\nput 2 3\nget 1\ndel 1\nget 1\ndel 5\nBye\n"
# The assignment's sample session, as the README shows it.
SESSION_OUTPUT = """\
Connected to server
Enter request: put 1 2
Server replied: OK
Enter request: put 1 3
Server replied: Key already exists
Enter request: put 2 3
Server replied: OK
Enter request: get 1
Server replied: 2
Enter request: del 1
Server replied: OK
Enter request: get 1
Server replied: Key not found
Enter request: del 5
Server replied: Key not found
Enter request: Bye
Server replied: Goodbye
"""


def build(output: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build client.c")
    return subprocess.run(["gcc", *flags, str(ROOT / "client.c"), "-o", str(output)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("client") / "client"
    result = build(binary, *WARNINGS)
    assert result.returncode == 0, result.stderr
    return binary


class Running:
    """A client process whose standard input stays open until the test closes it."""

    def __init__(self, binary: Path, server: ServerProcess) -> None:
        self.proc = subprocess.Popen([str(binary), server.host, str(server.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout = b""

    def read_until(self, marker: bytes, timeout: float = 10) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while marker not in self.stdout:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0, deadline - time.monotonic()))
            assert ready, f"client stalled; stdout so far: {self.stdout!r}"
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, f"client closed its output; stdout so far: {self.stdout!r}"
            self.stdout += chunk

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the client to exit by itself, its input still open; its status, stdout and stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"client still running after {timeout} s; it wrote {self.stdout + self.proc.stdout.read()!r}"
                        f" and on stderr {self.proc.stderr.read()!r}")
        return status, (self.stdout + self.proc.stdout.read()).decode(), self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# Building

def test_builds_without_warnings_when_optimised(tmp_path: Path) -> None:
    # Some of gcc's warnings (maybe-uninitialized, for one) need the optimiser.
    result = build(tmp_path / "client", "-O2", *WARNINGS)
    assert result.returncode == 0, result.stderr


# The normal session

def test_readme_shows_the_sample_session() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The C client", 1)[1].split("```", 2)[1]
    lines = block.strip("\n").splitlines()
    assert lines[:2] == ["$ gcc client.c -o client", "$ ./client 127.0.0.1 5000"]
    assert lines[-1] == "$"
    assert "\n".join(lines[2:-1]) + "\n" == SESSION_OUTPUT
    typed = [line.removeprefix("Enter request: ") for line in lines if line.startswith("Enter request: ")]
    assert "\n".join(typed) + "\n" == SESSION_INPUT


def test_sample_session_through_the_c_client(kvserver: ServerProcess, client_binary: Path) -> None:
    result = subprocess.run([str(client_binary), kvserver.host, str(kvserver.port)],
                            input=SESSION_INPUT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SESSION_OUTPUT
    assert result.stderr == ""


def test_c_client_in_a_terminal_shows_the_sample_session(kvserver: ServerProcess, client_binary: Path) -> None:
    # A pseudo-terminal echoes what is typed, exactly as a person sees it.
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([str(client_binary), kvserver.host, str(kvserver.port)],
                            stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal screen
        while screen.count(marker) < count:
            ready, _, _ = select.select([primary], [], [], 10)
            assert ready, f"client stalled; screen so far: {screen!r}"
            screen += os.read(primary, 4096)

    try:
        for n, line in enumerate(SESSION_INPUT.splitlines(), start=1):
            read_until(b"Enter request: ", n)
            os.write(primary, line.encode() + b"\n")
        assert proc.wait(10) == 0
        read_until(b"Goodbye", 1)
    finally:
        proc.kill()
        os.close(primary)
    assert screen.replace(b"\r\n", b"\n").decode() == SESSION_OUTPUT


def test_c_client_says_bye_at_end_of_input(kvserver: ServerProcess, client_binary: Path) -> None:
    result = subprocess.run([str(client_binary), "localhost", str(kvserver.port)],
                            input="put 5 6\n\nget 5\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["Enter request: Bye", "Server replied: Goodbye"]
    assert "Server replied: 6" in result.stdout


def test_c_client_stops_reading_at_goodbye(kvserver: ServerProcess, client_binary: Path) -> None:
    # Its input stays open after Bye: the Goodbye alone ends the session.
    client = Running(client_binary, kvserver)
    try:
        assert client.proc.stdin is not None
        client.proc.stdin.write(b"put 7 8\nBye\nget 7\n")
        client.proc.stdin.flush()
        status, stdout, stderr = client.finish(timeout=10)
    finally:
        client.close()
    assert status == 0, stderr
    assert stdout.endswith("Enter request: Bye\nServer replied: Goodbye\n")
    assert "get 7" not in stdout


def test_c_client_refuses_overlong_input(kvserver: ServerProcess, client_binary: Path) -> None:
    result = subprocess.run([str(client_binary), kvserver.host, str(kvserver.port)],
                            input="get " + "1" * 5000 + "\nget 1\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Request too long" in result.stdout
    assert "Server replied: Key not found" in result.stdout
    assert "Error" not in result.stdout


def test_c_client_reports_a_refused_connection(client_binary: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([str(client_binary), "127.0.0.1", str(port)], input="",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Cannot connect" in result.stderr


# Closes by the server

def test_c_client_reports_an_unexpected_close(client_binary: Path) -> None:
    server = start_server("--max-request", "16")
    try:
        result = subprocess.run([str(client_binary), server.host, str(server.port)],
                                input="get 12345678901234567\nget 1\n", capture_output=True, text=True, timeout=30)
    finally:
        server.stop()
    assert result.returncode == 1
    # The refusal is the reply to that request; the close that follows it comes with nothing more.
    assert "Server replied: Error: request too long\n" in result.stdout
    assert "Server replied: Key not found" not in result.stdout
    assert result.stderr == "Server closed the connection without a message\n"


def test_idle_timeout_is_reported_at_once(client_binary: Path) -> None:
    server = start_server("--idle-timeout", "1")
    client = Running(client_binary, server)
    try:
        # Nothing is typed: the client must notice the close by itself.
        status, stdout, stderr = client.finish(timeout=10)
    finally:
        client.close()
        server.stop()
    assert status == 1
    assert stdout == "Connected to server\nEnter request: \n"
    assert stderr == "Server closed the connection: Error: idle timeout\n"


def test_idle_timeout_in_a_terminal(client_binary: Path) -> None:
    server = start_server("--idle-timeout", "1")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([str(client_binary), server.host, str(server.port)],
                            stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""
    try:
        deadline = time.monotonic() + 10
        while b"idle timeout\r\n" not in screen:
            ready, _, _ = select.select([primary], [], [], max(0, deadline - time.monotonic()))
            assert ready, f"client stalled; screen so far: {screen!r}"
            screen += os.read(primary, 4096)
        assert proc.wait(10) == 1
    finally:
        proc.kill()
        proc.wait()
        os.close(primary)
        server.stop()
    assert screen.replace(b"\r\n", b"\n").decode() == (
        "Connected to server\nEnter request: \nServer closed the connection: Error: idle timeout\n")


@pytest.mark.parametrize("typed", [b"get 1\n", None], ids=["piped-input", "waiting-input"])
def test_refusal_over_the_connection_limit(client_binary: Path, typed: bytes | None) -> None:
    server = start_server("--max-connections", "1")
    try:
        with server.connect() as holder:
            # Make sure the server has taken this connection before the client comes.
            holder.sendall(b"get 1\n")
            assert holder.recv(100) == b"Key not found\n"
            client = Running(client_binary, server)
            try:
                assert client.proc.stdin is not None
                if typed is not None:
                    client.proc.stdin.write(typed)
                    client.proc.stdin.close()
                status, stdout, stderr = client.finish(timeout=10)
            finally:
                client.close()
    finally:
        server.stop()
    assert status == 1
    # Neither "Connected to server" nor a reply: the server never served this client.
    assert stdout == ""
    assert stderr == "Server closed the connection: Error: too many connections\n"


def test_server_killed_while_the_client_waits_at_its_prompt(client_binary: Path) -> None:
    server = start_server()
    client = Running(client_binary, server)
    try:
        assert client.proc.stdin is not None
        client.proc.stdin.write(b"put 1 2\n")
        client.proc.stdin.flush()
        client.read_until(b"Server replied: OK\nEnter request: ")
        server.kill()
        status, stdout, stderr = client.finish(timeout=10)
    finally:
        client.close()
        server.kill()
    assert status == 1
    assert stdout == "Connected to server\nEnter request: put 1 2\nServer replied: OK\nEnter request: \n"
    assert stderr == "Server closed the connection without a message\n"

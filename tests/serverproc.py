"""A real ``twistd -n kvstore`` process on a free loopback port, for integration tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

_LISTENING = re.compile(r"kvstore listening on (?:IPv[46]Address\(type='TCP', host='([^']+)', port=(\d+)\)|\S+)")


def twistd() -> str:
    """The twistd that belongs to the Python running the tests."""
    return str(Path(sys.executable).with_name("twistd"))


class ServerProcess:
    """A running server; ``stop`` and ``kill`` end it, ``log_text`` shows what it logged."""

    def __init__(self, proc: subprocess.Popen[bytes], logPath: Path) -> None:
        self.proc = proc
        self.logPath = logPath
        self.host = "127.0.0.1"
        self.port = 0

    def log_text(self) -> str:
        return self.logPath.read_text(errors="replace")

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_text())
            if match:
                if match.group(1):
                    self.host, self.port = match.group(1), int(match.group(2))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not start listening:\n{self.log_text()}")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


# Every log directory made here, removed at the end of the test session
# (tests read a server's log after stopping it, so not at stop).
_logDirs: list[Path] = []


def removeLogDirs() -> None:
    while _logDirs:
        shutil.rmtree(_logDirs.pop(), ignore_errors=True)


def start_server(
    *extra_args: str,
    cwd: str | os.PathLike[str] | None = None,
    port: str = "tcp:0:interface=127.0.0.1",
    wait: bool = True,
    twistdOptions: Sequence[str] = (),
    **popen: Any,
) -> ServerProcess:
    """Start ``twistd -n [twistdOptions] kvstore`` with ``extra_args``; port 0 lets the kernel pick a free port."""
    logDir = Path(tempfile.mkdtemp(prefix="kvtwist-server-"))
    _logDirs.append(logDir)
    logPath = logDir / "server.log"
    args = [twistd(), "-n", "--pidfile=", *twistdOptions, "kvstore", "--port", port, *extra_args]
    with open(logPath, "wb") as log:
        proc = subprocess.Popen(
            args, cwd=cwd or logDir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen
        )
    server = ServerProcess(proc, logPath)
    if wait:
        server.wait_listening()
    return server


def exchange(sock: socket.socket, requests: bytes, lines: int) -> bytes:
    """Send ``requests`` in one write and read until ``lines`` reply lines came (or the connection ended)."""
    sock.sendall(requests)
    received = b""
    while received.count(b"\n") < lines:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def session(server: ServerProcess, requests: bytes) -> bytes:
    """Everything the server answers to ``requests`` followed by ``bye``, on a connection of their own."""
    with server.connect() as sock:
        sock.sendall(requests + b"bye\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)

"""
A real ``redis-server`` on a free loopback port, for the engine tests.

``startRedis(*extraArgs)`` starts one with no persistence in a directory of
its own and returns once it answers PING; ``stop``, ``kill`` and
``restart`` drive faults; ``call`` sends it one command from the test.
Tests that need Redis skip when no ``redis-server`` is installed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import hiredis
import pytest

REDIS_SERVER = shutil.which("redis-server")

needsRedis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def freePort() -> int:
    """A loopback port nobody listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, *args: str | bytes | int, timeout: float = 10.0) -> object:
    """One command to the Redis on ``port``: its decoded reply (an error reply is returned, not raised)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return exchange(sock, [args])[0]


def exchange(sock: socket.socket, commands: list[tuple[str | bytes | int, ...]]) -> list[object]:
    """Send ``commands`` in one write on ``sock`` and read one reply each."""
    out = []
    for command in commands:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in command]
        out.append(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    sock.sendall(b"".join(out))
    reader = hiredis.Reader()
    replies: list[object] = []
    while len(replies) < len(commands):
        reply = reader.gets()
        if reply is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            reader.feed(data)
        else:
            replies.append(reply)
    return replies


class RedisProcess:
    """A running ``redis-server``: ``port`` is where it listens for plain RESP."""

    def __init__(self, args: list[str], port: int, directory: Path) -> None:
        self.args = args
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def logPath(self) -> Path:
        return self.directory / "redis.log"

    def logText(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        with open(self.logPath, "ab") as logFile:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, *self.args], cwd=self.directory, stdout=logFile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.logText()}")
            try:
                reply = call(self.port, "PING", timeout=1.0)
                # A server with a password answers NOAUTH: it is up all the same.
                if reply == b"PONG" or "NOAUTH" in str(reply):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s:\n{self.logText()}")

    def call(self, *args: str | bytes | int) -> object:
        return call(self.port, *args)

    def stop(self) -> None:
        """End it as an operator would (SIGTERM; nothing is saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """End it as a crash would (SIGKILL): connections drop, data in memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Start it again, on the same port with the same arguments, once it has ended."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stop it and remove its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def startRedis(*extraArgs: str, port: int = 0) -> RedisProcess:
    """A new ``redis-server`` on loopback ``port`` (0: a free one) with ``extraArgs``, answering PING."""
    directory = Path(tempfile.mkdtemp(prefix="kvtwist-redis-"))
    attempts = 1 if port else 3
    for attempt in range(attempts):
        chosen = port or freePort()
        args = ["--port", str(chosen), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
        args += ["--daemonize", "no", "--protected-mode", "no", *extraArgs]
        process = RedisProcess(args, chosen, directory)
        try:
            process.start()
            return process
        except RuntimeError:
            # Another program may have taken the free port between the check and the start.
            if attempt == attempts - 1:
                shutil.rmtree(directory, ignore_errors=True)
                raise
    raise AssertionError("unreachable")

"""
Integration: every way a connection ends gives back what it held, on TCP, TLS and Unix sockets.

Each test starts a real ``twistd kvstore`` and lets clients end their
connections in every way the server knows: ``Bye``, a request too long, an
idle timeout, a request timeout (a half-sent request, a slowloris, a TLS
client that never starts its handshake), a refusal over
``--max-connections``, and a client that fills the server's send buffer.
The clients misbehave on purpose: most of them never read and never close.

What is measured is what the server holds, seen from outside: the number of
its open file descriptors (``/proc/PID/fd``) must come back to what it was
before, within the server's own bounds (its timeouts plus ``CLOSE_GRACE``)
and a generous margin; its connection count must too, which shows as
``--max-connections`` admitting exactly that many clients again and refusing
the next one. Each client then reads what the server last told it, so a
connection that happens to end for the wrong reason fails as well.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import ssl
import struct
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvtwist.server.protocol import CLOSE_GRACE
from serverproc import ServerProcess, exchange, start_server
from tlscert import clientContext, selfSignedPem

KINDS = ["tcp", "tls", "unix"]
# Every server here admits this many clients at once.
SLOTS = 8
POLL = 0.05
# Beyond the server's own bounds, how long an ending may take to show.
MARGIN = 5.0

GOODBYE = b"Goodbye\n"
TOO_LONG = b"Error: request too long\n"
REQUEST_TIMEOUT = b"Error: request timeout\n"
IDLE = b"Error: idle timeout\n"
TOO_MANY = b"Error: too many connections\n"

# The flooding clients pipeline this without reading the replies, which are
# more than twice as long, so the server's send buffer fills up.
FLOOD_CHUNK = b"get 1\n" * 10923
# More than the kernel can hold on both sides, requests and replies: a flood
# that all went out means the server never stopped reading it.
FLOOD_LIMIT = 96 << 20
# No progress sending for this long: the server has stopped reading.
STALLED = 0.3


@dataclass
class Server:
    """A running server, how to reach it over one kind of socket, and its descriptors before any test client."""

    process: ServerProcess
    kind: str
    unixPath: Path | None = None
    tls: ssl.SSLContext | None = None
    baseline: int = 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.proc.pid}/fd"))

    def raw(self) -> socket.socket:
        """A connected socket; over TLS, one that has not started its handshake."""
        if self.unixPath is not None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(str(self.unixPath))
            return sock
        return self.process.connect()

    def open(self) -> socket.socket:
        """A connected client, past the handshake over TLS; a TLS close without close_notify raises."""
        sock = self.raw()
        if self.tls is None:
            return sock
        return self.tls.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)

    def waitForFds(self, count: int, within: float, why: str) -> float:
        """Poll until the server holds ``count`` descriptors; the seconds it took."""
        started = time.monotonic()
        while (now := self.fds()) != count:
            if time.monotonic() - started > within:
                pytest.fail(f"{self.kind}: {why}: the server holds {now} descriptors, not {count}, after {within:g} s")
            time.sleep(POLL)
        return time.monotonic() - started

    def waitForBaseline(self, within: float, why: str) -> float:
        return self.waitForFds(self.baseline, within, why)


@pytest.fixture
def startServer() -> Iterator[Callable[..., Server]]:
    """Start servers for one test (``startServer(kind, *options)``) and stop them all at its end."""
    started: list[ServerProcess] = []
    # Not pytest's tmp_path: a Unix socket's path must stay short.
    directory = Path(tempfile.mkdtemp(prefix="kvend-"))

    def start(kind: str, *options: str) -> Server:
        unixPath, tls = None, None
        if kind == "tls":
            pytest.importorskip("OpenSSL", reason="ssl: endpoints need the tls extra")
            pem = selfSignedPem(directory)
            port, tls = f"ssl:0:interface=127.0.0.1:privateKey={pem}", clientContext(pem)
        elif kind == "unix":
            unixPath = directory / f"kv{len(started)}.sock"
            port = f"unix:{unixPath}"
        else:
            port = "tcp:0:interface=127.0.0.1"
        process = start_server("--max-connections", str(SLOTS), *options, port=port)
        started.append(process)
        server = Server(process, kind, unixPath, tls)
        server.baseline = settledFds(server)
        assertServes(server)
        return server

    try:
        yield start
    finally:
        for process in started:
            process.stop()
        shutil.rmtree(directory, ignore_errors=True)


def settledFds(server: Server) -> int:
    """The server's descriptor count once it has stayed the same for a few polls."""
    counts = [server.fds()]
    deadline = time.monotonic() + MARGIN
    while len(counts) < 6 or len(set(counts[-6:])) > 1:
        assert time.monotonic() < deadline, f"the descriptor count never settled: {counts[-6:]}"
        time.sleep(POLL)
        counts.append(server.fds())
    return counts[-1]


def readAll(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """
    Everything the connection still delivers, and how it ended.

    ``eof``: an orderly close (over TLS, with close_notify); ``reset``: a
    reset or a TLS close without close_notify; ``open``: nothing ended it
    within ``timeout``.
    """
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except socket.timeout:  # not TimeoutError: before Python 3.10 the two differ
        return bytes(received), "open"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return bytes(received), "reset"
    return bytes(received), "eof"


def ask(sock: socket.socket, request: bytes) -> bytes:
    """Send one request and read its one reply line."""
    return exchange(sock, request, 1)


def assertServes(server: Server) -> None:
    """A new client gets a whole session (put, get, Bye, an orderly close), and the server lets it go."""
    with server.open() as sock:
        assert ask(sock, b"put 42 7\n") in (b"OK\n", b"Key already exists\n")
        assert ask(sock, b"get 42\n") == b"7\n"
        sock.sendall(b"Bye\n")
        assert readAll(sock) == (GOODBYE, "eof")
    # The server learns of the close a moment later; until then it holds a slot.
    server.waitForBaseline(CLOSE_GRACE + MARGIN, "after a client said Bye")


def assertSlotsAreFree(server: Server) -> None:
    """Exactly ``SLOTS`` clients are served at once and the next is refused: no slot is held by a past connection."""
    clients = [server.open() for _ in range(SLOTS)]
    try:
        for sock in clients:
            assert ask(sock, b"get 1\n") == b"Key not found\n"
        with server.open() as extra:
            assert readAll(extra)[0] == TOO_MANY
    finally:
        for sock in clients:
            sock.close()
    server.waitForBaseline(MARGIN, "after the clients that checked the slots left")
    assertServes(server)


def served(server: Server) -> socket.socket:
    """A new client that the server has accepted and served once."""
    sock = server.open()
    assert ask(sock, b"get 1\n") == b"Key not found\n"
    return sock


def trySend(sock: socket.socket, data: bytes) -> int:
    """Send without blocking; how much went out (0 when the kernel takes nothing now)."""
    try:
        return sock.send(data)
    except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
        return 0


# The endings. Each is one client; ``begin`` opens its connection and does
# what ends it, ``tick`` is called every POLL seconds meanwhile, and
# ``expect`` is what it must find unread once the server is done with it.


class Ending:
    """A client, and the way it ends its connection."""

    name = ""
    expect: bytes | None = None

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        # What it has already taken of the server's last words.
        self.received = b""

    def begin(self, server: Server) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        pass

    def check(self) -> None:
        """Once the server has let go: the client finds exactly the last reply it was due."""
        assert self.sock is not None
        if self.expect is not None:
            received, how = readAll(self.sock)
            assert self.received + received == self.expect, self.name
            assert how != "open", f"{self.name}: the server's side is gone but the client's is not"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class ByeAndRead(Ending):
    """Bye, read the Goodbye, and see an orderly close (over TLS, close_notify)."""

    name = "Bye, then read to the end"

    def begin(self, server: Server) -> None:
        self.sock = server.open()
        self.sock.sendall(b"Bye\n")
        # A TLS close that had to wait for CLOSE_GRACE would show as a reset.
        assert readAll(self.sock) == (GOODBYE, "eof"), self.name
        self.sock.close()

    def check(self) -> None:
        pass


class SendsThenWaits(Ending):
    """Once served, sends ``data`` in one write; then neither reads nor closes."""

    def __init__(self, name: str, data: bytes, expect: bytes) -> None:
        super().__init__()
        self.name, self.data, self.expect = name, data, expect

    def begin(self, server: Server) -> None:
        self.sock = served(server)
        self.sock.sendall(self.data)


class Slowloris(Ending):
    """One byte of a request every 0.3 s, until the server answers."""

    name = "a byte every 0.3 s"
    expect = REQUEST_TIMEOUT
    every = 0.3

    def begin(self, server: Server) -> None:
        self.sock = served(server)
        self.sock.setblocking(False)
        self.trickle = iter(b"put 1 " + b"1" * 1000)
        self.answered = False
        self.next = 0.0
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        assert self.sock is not None
        if self.answered or now < self.next:
            return
        # Stop once the server has said something: bytes sent into a closed
        # connection would only reset it.
        try:
            self.received += self.sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError):
            self.sock.send(bytes([next(self.trickle)]))
            self.next = now + self.every
            return
        except OSError:
            pass  # Reset: check() says whether the reply came first.
        self.answered = True


class NoHandshake(Ending):
    """Over TLS: connects, and never sends a ClientHello."""

    name = "a TLS client that never starts its handshake"

    def begin(self, server: Server) -> None:
        # Begun before the others, so the server's accepting it shows alone.
        before = server.fds()
        self.sock = server.raw()
        server.waitForFds(before + 1, MARGIN, "accepting a TLS client")

    def check(self) -> None:
        assert self.sock is not None
        received, how = readAll(self.sock)
        assert received == b"", "nothing can be sent before a handshake"
        assert how != "open"


class Refused(Ending):
    name = "refused over --max-connections, never reading"
    expect = TOO_MANY

    def begin(self, server: Server) -> None:
        self.sock = server.open()
        if server.tls is None:
            # Refused already, not only queued to be accepted: the refusal
            # has arrived (peeking leaves it unread). Over TLS, the
            # finished handshake shows the server has it.
            self.sock.recv(1, socket.MSG_PEEK)


class Flood(Ending):
    """
    Pipelines gets without reading a reply until the server stops taking them.

    The server's replies fill its send buffer, the transport pauses the
    protocol, and the server stops reading. ``Bye`` follows, though it
    cannot arrive: the server reads nothing more. ``lastRead`` is a moment
    by which the server had stopped reading, ``stillReading`` one at which
    it had not yet.
    """

    name = "a client that fills the server's send buffer"
    chunk = FLOOD_CHUNK

    def begin(self, server: Server) -> None:
        self.sock = sock = server.open()
        sock.setblocking(False)
        sent = 0
        lastProgress = time.monotonic()
        while time.monotonic() - lastProgress < STALLED:
            progress = trySend(sock, self.chunk)
            if progress:
                sent += progress
                lastProgress = time.monotonic()
                assert sent < FLOOD_LIMIT, "the server never stopped reading: its flow control is off"
            else:
                time.sleep(0.01)
        # Sending stalls once the server's receive buffer is full, which a
        # slow server reaches while still reading: watch what it has not read
        # until that stays the same. It read until about when sending last
        # made progress, since its receive buffer fills within moments.
        self.stillReading = lastProgress - 0.1
        unread, sampled = unreadByServer(server, sock), time.monotonic()
        self.lastRead = sampled
        while time.monotonic() - self.lastRead < STALLED:
            time.sleep(POLL)
            now, current = time.monotonic(), unreadByServer(server, sock)
            if current != unread:
                # It read between the last sample and this one.
                self.stillReading, self.lastRead, unread = sampled, now, current
            sampled = now
        # Over TLS the last, unfinished write may only be retried with the
        # same bytes, so there the flood simply stops.
        if server.tls is None:
            trySend(sock, b"Bye\n")

    def check(self) -> None:
        # What reached the client before the abort is some replies, not judged.
        pass


def unreadByServer(server: Server, sock: socket.socket) -> int:
    """What the server has not read of what ``sock`` sent: its socket's receive queue, or for Unix our send queue."""
    if server.unixPath is not None:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    # The server's end of this connection: local and remote are ours, swapped.
    def hexAddress(address: tuple[str, int]) -> str:
        return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(address[0]))[0], address[1])

    ends = (hexAddress(sock.getpeername()), hexAddress(sock.getsockname()))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == ends:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError("the server's end of the connection is not in /proc/net/tcp")


def runEndings(server: Server, endings: list[Ending], within: float) -> None:
    """Begin every ending at once, wait until the server holds no more descriptors than before, check each."""
    try:
        for ending in endings:
            ending.begin(server)
        started = time.monotonic()
        while server.fds() != server.baseline:
            now = time.monotonic()
            if now - started > within:
                pytest.fail(
                    f"{server.kind}: the server holds {server.fds()} descriptors, not {server.baseline}, "
                    f"{within:g} s after: {', '.join(e.name for e in endings)}"
                )
            for ending in endings:
                ending.tick(now)
            time.sleep(POLL)
        for ending in endings:
            ending.check()
    finally:
        for ending in endings:
            ending.close()


@pytest.mark.parametrize("kind", KINDS)
def test_requests_that_end_a_connection_give_back_its_descriptor_and_slot(
    startServer: Callable[..., Server], kind: str
) -> None:
    requestTimeout = 1.0
    server = startServer(kind, "--request-timeout", str(requestTimeout))
    endings: list[Ending] = [
        ByeAndRead(),
        SendsThenWaits("Bye, never reading nor closing", b"Bye\n", GOODBYE),
        SendsThenWaits("a request too long, never reading", b"put 1 " + b"1" * 5000, TOO_LONG),
        SendsThenWaits("half a request, then nothing", b"put 1", REQUEST_TIMEOUT),
        Slowloris(),
    ]
    if kind == "tls":
        endings.insert(0, NoHandshake())
    runEndings(server, endings, requestTimeout + CLOSE_GRACE + MARGIN)
    assertServes(server)

    # A refusal, to a client that never reads, while SLOTS clients are served;
    # then those clients end too, the plainest way: they close.
    holders = [server.open() for _ in range(SLOTS)]
    refused = Refused()
    try:
        for sock in holders:
            assert ask(sock, b"get 1\n") == b"Key not found\n"
        refused.begin(server)
    finally:
        for sock in holders:
            sock.close()
    try:
        server.waitForBaseline(CLOSE_GRACE + MARGIN, "after a refusal and the close of the clients served")
        refused.check()
    finally:
        refused.close()
    assertSlotsAreFree(server)


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_says_bye_and_closes_is_let_go_at_once(startServer: Callable[..., Server], kind: str) -> None:
    """
    After Goodbye the server must still be reading: over TLS its close waits for the client's close_notify or close.

    A server that stops reading when it closes, or whose transport still
    has the protocol as its producer, holds the connection until the abort
    after ``CLOSE_GRACE``.
    """
    server = startServer(kind)
    sock = served(server)
    sock.sendall(b"Bye\n")
    assert readAll(sock) == (GOODBYE, "eof")
    sock.close()
    closed = time.monotonic()
    server.waitForBaseline(CLOSE_GRACE + MARGIN, "after a client said Bye, read Goodbye and closed")
    assert time.monotonic() - closed < CLOSE_GRACE - 1.0, "the connection ended only by the abort after CLOSE_GRACE"
    assertSlotsAreFree(server)


@pytest.mark.parametrize("kind", KINDS)
def test_clients_that_never_read_are_ended_and_give_back_their_descriptor_and_slot(
    startServer: Callable[..., Server], kind: str
) -> None:
    # Well above the flood's STALLED, as in the test below.
    idleTimeout = 1.5
    server = startServer(kind, "--idle-timeout", str(idleTimeout))
    flood = Flood()
    # Begun first: its stall takes a moment, and the idle client must not
    # have timed out before the flood is under way.
    idle = SendsThenWaits("connected and silent, never reading", b"", IDLE)
    runEndings(server, [flood, idle], idleTimeout + CLOSE_GRACE + MARGIN)
    assertServes(server)
    assertSlotsAreFree(server)


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_reads_its_backlog_late_is_closed_once_it_has(
    startServer: Callable[..., Server], kind: str
) -> None:
    """
    The server ends a connection while its send buffer is full; once the client reads it all, it is closed at once.

    This is where a close path that keeps the paused protocol registered as
    the transport's producer fails: when the buffer drains, the transport
    resumes that producer instead of closing. Over TLS, a close path that
    leaves the reading paused fails too: it never sees the client's
    close_notify or close. Either way only the abort after ``CLOSE_GRACE``
    ends the connection.
    """
    # Well above the flood's STALLED: the idle timeout must not end the
    # connection (which resumes reading, to discard) while the flood is
    # still being sent, however slowly a loaded machine runs the client.
    idleTimeout = 1.5
    server = startServer(kind, "--idle-timeout", str(idleTimeout))
    flood = Flood()
    try:
        flood.begin(server)
        # Read only once the idle timeout has surely ended the connection.
        time.sleep(max(0.0, flood.lastRead + idleTimeout + 0.5 - time.monotonic()))
        assert flood.sock is not None
        received, how = readAll(flood.sock, timeout=CLOSE_GRACE + MARGIN)
        assert how != "open"
        assert received.startswith(b"Key not found\n")
        flood.sock.close()
        server.waitForBaseline(CLOSE_GRACE + MARGIN, "after a flooding client read everything")
        # The server was still reading at ``stillReading``, so the idle
        # timeout fired after it, and the abort CLOSE_GRACE later still.
        abort = flood.stillReading + idleTimeout + CLOSE_GRACE
        assert time.monotonic() < abort - 1.0, "the connection ended only by the abort after CLOSE_GRACE"
    finally:
        flood.close()
    assertSlotsAreFree(server)


@pytest.mark.parametrize("kind", ["tcp", "tls", "unix"])
def test_a_client_that_floods_says_bye_and_never_reads_has_the_request_timeout(
    startServer: Callable[..., Server], kind: str
) -> None:
    """
    No idle timeout: the request timeout must end a connection whose replies are not taken.

    The Bye never arrives (the server has stopped reading), so only a timeout
    can end this connection. The requests are 8 bytes, a divisor of the
    server's 4 KiB reads, so the server does not stop in the middle of one:
    no request is unfinished, and the request clock must count the time the
    replies wait instead.
    """
    # Well beyond STALLED, even on a busy machine: the flood must see the
    # server stop reading before the timeout ends the connection, since the
    # server then reads (and ignores) everything until its close is done.
    requestTimeout = 1.5
    server = startServer(kind, "--request-timeout", str(requestTimeout))
    flood = Flood()
    flood.chunk = b"get 123\n" * 8192
    runEndings(server, [flood], requestTimeout + CLOSE_GRACE + MARGIN)
    assertSlotsAreFree(server)

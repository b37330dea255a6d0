"""
Small servers for the kvtwist protocol with deliberate bugs, for testing kvtwist-check.

Each is a real server on a real loopback socket, in its own process:
``python brokenservers.py NAME`` listens on a free port of 127.0.0.1 and
prints the port on its first line of output. ``brokenServer(NAME)`` does
that from a test and stops the process afterwards.

They are written the way a student might write them (asyncio, or a plain
blocking socket loop), so the checker is tested against servers that are
not kvtwist:

- ``correct``: right in everything the basic profile checks, but with its own
  error texts and a lenient integer parser; it must pass the
  ``basic`` profile and fail the ``kvtwist`` one.
- ``overwrite``: ``put`` replaces an existing value and says ``OK``.
- ``lossy``: every 10th ``put`` says ``OK`` but stores nothing.
- ``per-client``: each connection has a store of its own.
- ``one-at-a-time``: serves one connection until it closes, then the next.
- ``reorder``: answers the requests of one received chunk in reverse order.
- ``flaky KEY...``: correct and atomic, but its store is sometimes
  "unavailable" for the given keys: every 4th request on them gets
  ``Error: store unavailable (outcome unknown)``, and every other put or
  del so answered was applied all the same. It must pass: an ``Error: ``
  reply may or may not have taken effect. The request ``faults`` gets the
  number of such replies sent so far and how many of them were writes
  applied all the same (``FAULTS APPLIED``).
- ``flaky-garbage KEY...``: the same, but the reply lacks the ``Error: ``
  prefix, so it is a reply the protocol does not allow: it must fail.

``python brokenservers.py NAME [KEY...]`` passes the keys on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from typing import Callable, Iterator

#: A line longer than this closes the connection (the correct server has
#: to do something about a client that never sends LF).
MAX_LINE = 1 << 16


class Store:
    """The correct semantics; the broken variants override one method."""

    def __init__(self) -> None:
        self.data: dict[int, int] = {}

    def put(self, key: int, value: int) -> str:
        if key in self.data:
            return "Key already exists"
        self.data[key] = value
        return "OK"

    def get(self, key: int) -> str:
        return str(self.data[key]) if key in self.data else "Key not found"

    def delete(self, key: int) -> str:
        return "OK" if self.data.pop(key, None) is not None else "Key not found"


class OverwritingStore(Store):
    def put(self, key: int, value: int) -> str:
        self.data[key] = value
        return "OK"


class FlakyStore(Store):
    """
    Atomic, but the store behind it is sometimes unreachable for ``keys``: a
    remote store's timeout, where the write may or may not have been made.
    """

    def __init__(self, keys: set[int], unavailable: str) -> None:
        super().__init__()
        self.keys = keys
        self.unavailable = unavailable
        self.requests = 0
        #: Replies of ``unavailable`` sent, and the writes among them that were applied.
        self.faults = 0
        self.applied = 0

    def _fails(self, key: int) -> bool:
        if key not in self.keys:
            return False
        self.requests += 1
        if self.requests % 4:
            return False
        self.faults += 1
        return True

    def _write(self, key: int, apply: Callable[[], str]) -> str:
        if not self._fails(key):
            return apply()
        if self.faults % 2:
            self.applied += 1
            apply()
        return self.unavailable

    def put(self, key: int, value: int) -> str:
        return self._write(key, lambda: super(FlakyStore, self).put(key, value))

    def delete(self, key: int) -> str:
        return self._write(key, lambda: super(FlakyStore, self).delete(key))

    def get(self, key: int) -> str:
        return self.unavailable if self._fails(key) else super().get(key)


#: What ``flaky`` answers when its store is unavailable; ``flaky-garbage``
#: sends the same words without the ``Error: `` prefix.
UNAVAILABLE = "Error: store unavailable (outcome unknown)"


class LossyStore(Store):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, key: int, value: int) -> str:
        self.puts += 1
        if self.puts % 10 == 0 and key not in self.data:
            return "OK"
        return super().put(key, value)


def respond(store: Store, line: bytes) -> tuple[str | None, bool]:
    """The reply to one request line (None for a blank one) and whether to close after it."""
    words = line.decode("latin-1").split()
    if not words:
        return None, False
    verb, arguments = words[0].lower(), words[1:]
    try:
        numbers = [int(argument) for argument in arguments]
    except ValueError:
        return "ERR numbers only, please", False
    if verb == "bye" and not numbers:
        return "Goodbye", True
    if verb == "faults" and not numbers and isinstance(store, FlakyStore):
        return f"{store.faults} {store.applied}", False
    if verb == "put" and len(numbers) == 2:
        return store.put(*numbers), False
    if verb == "get" and len(numbers) == 1:
        return store.get(*numbers), False
    if verb == "del" and len(numbers) == 1:
        return store.delete(*numbers), False
    return "ERR what?", False


class LineServer(asyncio.Protocol):
    """One connection of an asyncio server; replies to each chunk's requests in one write."""

    def __init__(self, store: Store, reverse: bool = False) -> None:
        self.store = store
        self.reverse = reverse
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        replies = []
        close = False
        for line in lines:
            reply, close = respond(self.store, line.rstrip(b"\r"))
            if reply is not None:
                replies.append(reply)
            if close:
                break
        if len(self.buffer) > MAX_LINE:
            replies.append("ERR line too long")
            close = True
        if self.reverse:
            replies.reverse()
        self.transport.write(b"".join(reply.encode() + b"\n" for reply in replies))
        if close:
            self.transport.close()


def serveOneAtATime(listener: socket.socket) -> None:
    """A blocking server: the next connection waits until the current one is closed."""
    store = Store()
    while True:
        connection, _ = listener.accept()
        with connection, contextlib.suppress(OSError):
            serveConnection(connection, store)


def serveConnection(connection: socket.socket, store: Store) -> None:
    buffer = b""
    while True:
        data = connection.recv(65536)
        if not data:
            return
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            reply, close = respond(store, line.rstrip(b"\r"))
            if reply is not None:
                connection.sendall(reply.encode() + b"\n")
            if close:
                return
        if len(buffer) > MAX_LINE:
            return


async def serveAsyncio(listener: socket.socket, name: str, keys: set[int]) -> None:
    shared: Store
    if name == "flaky":
        shared = FlakyStore(keys, UNAVAILABLE)
    elif name == "flaky-garbage":
        shared = FlakyStore(keys, UNAVAILABLE.removeprefix("Error: "))
    else:
        shared = {"overwrite": OverwritingStore, "lossy": LossyStore}.get(name, Store)()

    def connection() -> LineServer:
        if name == "per-client":
            return LineServer(Store())
        return LineServer(shared, reverse=name == "reorder")

    server = await asyncio.get_running_loop().create_server(connection, sock=listener)
    await server.serve_forever()


NAMES = ("correct", "overwrite", "lossy", "per-client", "one-at-a-time", "reorder", "flaky", "flaky-garbage")


def main(name: str, keys: set[int]) -> None:
    if name not in NAMES:
        raise SystemExit(f"unknown server {name!r}; one of {', '.join(NAMES)}")
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(listener.getsockname()[1], flush=True)
    if name == "one-at-a-time":
        serveOneAtATime(listener)
    else:
        asyncio.run(serveAsyncio(listener, name, keys))


@contextlib.contextmanager
def brokenServer(name: str, *keys: int) -> Iterator[tuple[str, int]]:
    """Run server ``name`` (given ``keys``, for ``flaky``) in a child process; yields its (host, port)."""
    process = subprocess.Popen(
        [sys.executable, __file__, name, *map(str, keys)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield "127.0.0.1", port
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main(sys.argv[1], {int(key) for key in sys.argv[2:]})
